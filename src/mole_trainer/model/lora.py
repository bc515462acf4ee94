"""LoRA adapters on the language model of Qwen3-VL (never the vision tower)."""

from __future__ import annotations

import re

from ..config import LoraSpec


def target_regex(targets: list[str]) -> str:
    """Regex matching the chosen projections (validated by LoraSpec) inside the language-model layers."""
    names = "|".join(re.escape(t) for t in targets)
    return rf".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def peft_config(spec: LoraSpec, inference: bool = False):
    """PEFT LoraConfig for a spec."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_regex(spec.targets),
        bias="none",
        inference_mode=inference,
        task_type="CAUSAL_LM",
    )


def attach_lora(base, spec: LoraSpec, seed: int):
    """Wrap `base` in a PeftModel with a fresh, seeded LoRA named 'default'."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, peft_config(spec))


def detach_lora(peft_model):
    """Remove the LoRA layers and return the untouched base model for the next adapter."""
    return peft_model.unload()
