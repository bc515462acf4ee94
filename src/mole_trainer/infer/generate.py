"""Greedy generation for batches of (images, instruction) samples with whatever adapter is active."""

from __future__ import annotations

from ..data.preprocess import collate, encode_prompt, load_images
from ..data.records import Sample


def generate(
    model, processor, samples: list[Sample], max_new_tokens: int = 48, batch_size: int = 8
) -> list[str]:
    """Answers for samples (left-padded batches, greedy, stopping at Qwen's end-of-turn tokens)."""
    import torch

    tok = processor.tokenizer
    device = next(model.parameters()).device
    outputs: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        encoded = []
        for s in chunk:
            enc = encode_prompt(processor, s.messages(with_answer=False), load_images(s))
            encoded.append(
                {k: (v if k in ("pixel_values", "image_grid_thw") else v[0]) for k, v in enc.items()}
            )
        batch = {k: v.to(device) for k, v in collate(encoded, tok.pad_token_id, padding_side="left").items()}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return outputs
