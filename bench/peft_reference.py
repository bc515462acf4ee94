"""Qwen3-VL-shaped models with random weights, synthetic image + chat rows, and plain PEFT training.

The reference that bench/gpu_train.py measures the package against: get_peft_model, Hugging Face's
own loss (`labels=` in the forward: logits over the whole vocabulary at every position), torch's
default AdamW, one step after another. The shapes are those of the published Qwen3-VL-2B and -8B
configs (8B: tests/fixtures/qwen3-vl-8b-processor/config.json); `tiny` and `tiny151k` (the same
with Qwen's 151,936-token vocabulary) are for the CPU.
"""

from __future__ import annotations

import time

# Qwen3-VL text and vision sizes; `tie` is tie_word_embeddings (2B ties its head, 8B does not)
SHAPES = {
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=1024),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, deepstack_visual_indexes=[0, 1]),
        "tie": True,
        "image_px": 128,
    },
    "tiny151k": {  # tiny, with Qwen's real vocabulary: what the output head costs, measurable on a CPU
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=151936),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, deepstack_visual_indexes=[0, 1]),
        "tie": True,
        "image_px": 128,
    },
    "2b": {
        "text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                       deepstack_visual_indexes=[5, 11, 17]),
        "tie": True,
        "image_px": 448,
    },
    "8b": {
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                       deepstack_visual_indexes=[8, 16, 24]),
        "tie": False,
        "image_px": 896,
    },
}  # fmt: skip
PATCH, MERGE, TEMPORAL = 16, 2, 2
QWEN_SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                        vision_end_token_id=151653)  # fmt: skip


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's split of the rotary half-dimension over (time, height, width): [24, 20, 20] at head_dim 128."""
    half = head_dim // 2
    t = half * 3 // 8
    h = (half - t) // 2
    return [t, h, half - t - h]


def special_ids(vocab: int) -> dict:
    """Qwen's image/video/vision-start/end ids, or the top four ids of a smaller vocabulary."""
    if vocab > max(QWEN_SPECIAL_IDS.values()):
        return dict(QWEN_SPECIAL_IDS)
    return dict(zip(QWEN_SPECIAL_IDS, range(vocab - 4, vocab), strict=True))


def build(shape: str, device: str, dtype, attn: str = "sdpa"):
    """A random-weight Qwen3VLForConditionalGeneration of `shape`, made on `device` in `dtype`."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    s = SHAPES[shape]
    text = dict(
        s["text"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_section(s["text"]["head_dim"]),
            "mrope_interleaved": True,
        },
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=s["tie"],
    )
    vision = dict(
        s["vision"],
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL,
        spatial_merge_size=MERGE,
        in_channels=3,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=2304,
        hidden_act="gelu_pytorch_tanh",
    )
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=s["tie"],
        **special_ids(text["vocab_size"]),
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)  # the same random weights in every run
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), cfg


def lm_params(model) -> int:
    """Language-model parameters outside the embedding (the 4 N tokens FLOP count's N)."""
    return sum(p.numel() for n, p in model.named_parameters() if "language_model" in n and "embed" not in n)


def rows(cfg, n: int, image_px: int, prompt: int, answer: int, dtype, seed: int) -> list[dict]:
    """n examples in the package's format: one image, a prompt and an answer; only the answer supervised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    grid = image_px // PATCH
    image_tokens = grid * grid // (MERGE * MERGE)
    top = min(cfg.text_config.vocab_size - 8, 150_000)  # ordinary text ids, below the special ones
    out = []
    for _ in range(n):
        text = torch.randint(0, top, (prompt + answer,), generator=gen)
        ids = torch.cat(
            [
                torch.tensor([cfg.vision_start_token_id]),
                torch.full((image_tokens,), cfg.image_token_id),
                torch.tensor([cfg.vision_end_token_id]),
                text,
            ]
        )
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == cfg.image_token_id).int(),
                "labels": labels,
                "pixel_values": torch.randn(grid * grid, 3 * TEMPORAL * PATCH * PATCH, generator=gen).to(
                    dtype
                ),
                "image_grid_thw": torch.tensor([[1, grid, grid]]),
            }
        )
    return out


def sync(device) -> None:
    """Wait for queued GPU work (a timing must cover it)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def plain_peft_seconds(model, lora_config, train_rows: list[dict], batch: int, steps: int, pad_id: int = 0):
    """Seconds of `steps` plain-PEFT steps (HF loss, default AdamW) on fresh LoRA; the model is left bare.

    Batches are consecutive `batch` rows of `train_rows` (wrapping around), padded on the right.
    """
    import torch
    from peft import get_peft_model

    from mole_trainer.data.preprocess import collate

    device = next(model.parameters()).device
    pm = get_peft_model(model, lora_config)
    try:
        params = [p for p in pm.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=1e-4)
        pm.train()
        sync(device)
        t0 = time.perf_counter()
        for step in range(steps):
            picked = [train_rows[(step * batch + i) % len(train_rows)] for i in range(batch)]
            inputs = {k: v.to(device) for k, v in collate(picked, pad_id).items()}
            optim.zero_grad(set_to_none=True)
            pm(**inputs).loss.backward()  # `labels` in inputs: HF's full-vocabulary loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
        sync(device)
        return time.perf_counter() - t0
    finally:
        pm.unload()
