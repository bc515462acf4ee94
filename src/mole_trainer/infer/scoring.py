"""Router scoring: the log-probability of every label, for a batch of requests, in one forward pass.

For each request the router prompt is encoded once (the image processor runs once); each label's
tokens plus the end-of-turn token are appended to make K rows that run through the model together,
so the vision tower sees the image K times (sharing the prompt's KV cache would remove that). The sum of
the label-token log-probabilities gives a score per expert; a softmax over experts gives the
routing distribution (top-k, calibration and abstention need a full distribution, not a sample).
"""

from __future__ import annotations

from ..data.formats import Sample
from ..data.preprocess import collate, encode_prompt, load_images
from ..model.chat import end_of_turn
from ..router_prompt import router_messages


def label_token_ids(tokenizer, names: list[str]) -> list[list[int]]:
    """Token ids of each label answer as the router is trained to write it (label + end of turn)."""
    return [tokenizer(n + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"] for n in names]


def encode_router_prompts(processor, samples: list[Sample], names: list[str]) -> list[dict]:
    """Encoded router prompts (input ids, masks, pixels) for samples."""
    out = []
    for s in samples:
        enc = encode_prompt(processor, router_messages(s.instruction, len(s.images), names), load_images(s))
        out.append({k: (v if k in ("pixel_values", "image_grid_thw") else v[0]) for k, v in enc.items()})
    return out


def score_encoded(model, prompts: list[dict], label_ids: list[list[int]], pad_id: int):
    """Log-probability matrix [n, K] of each label after each encoded prompt (one forward pass)."""
    import torch

    rows, spans = [], []
    for p in prompts:
        n = len(p["input_ids"])
        for ids in label_ids:
            lab = torch.tensor(ids, dtype=p["input_ids"].dtype)
            row = {
                "input_ids": torch.cat([p["input_ids"], lab]),
                "attention_mask": torch.cat([p["attention_mask"], torch.ones_like(lab)]),
            }
            if "mm_token_type_ids" in p:
                row["mm_token_type_ids"] = torch.cat([p["mm_token_type_ids"], torch.zeros_like(lab)])
            if "pixel_values" in p:
                row["pixel_values"], row["image_grid_thw"] = p["pixel_values"], p["image_grid_thw"]
            rows.append(row)
            spans.append((n, len(ids)))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows, pad_id, padding_side="right").items()}
    with torch.no_grad():
        logits = model(**batch).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    scores = torch.empty(len(rows))
    for r, (start, length) in enumerate(spans):
        targets = batch["input_ids"][r, start : start + length]
        # the token at position t is predicted by the logits at t - 1
        scores[r] = logp[r, start - 1 : start + length - 1].gather(-1, targets[:, None]).sum()
    return scores.view(len(prompts), len(label_ids))


def route_probs(model, processor, samples: list[Sample], names: list[str], batch_size: int = 8):
    """Routing distribution [n, K] (softmax over label log-probabilities) for samples."""
    import torch

    label_ids = label_token_ids(processor.tokenizer, names)
    pad_id = processor.tokenizer.pad_token_id
    out = [
        encoded_probs(
            model,
            encode_router_prompts(processor, samples[i : i + batch_size], names),
            label_ids,
            pad_id,
            batch_size,
        )
        for i in range(0, len(samples), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, len(names))


def encoded_probs(model, prompts: list[dict], label_ids: list[list[int]], pad_id: int, batch_size: int = 8):
    """route_probs for prompts encoded beforehand (a validation set scored at every evaluation)."""
    import torch

    out = [
        torch.softmax(score_encoded(model, prompts[i : i + batch_size], label_ids, pad_id), dim=-1)
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, len(label_ids))
