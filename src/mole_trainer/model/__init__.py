"""Model stage: base model loading, the tiny offline Qwen3-VL, LoRA helpers."""
