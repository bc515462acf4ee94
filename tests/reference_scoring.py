"""The K-row router scoring the one-prefill scorer replaced, kept ONLY as a reference (tests, bench).

Each request's prompt is repeated K times with one label appended, the K rows run through the model
together (the vision tower sees each image K times) and a full-vocabulary fp32 log-softmax is taken at
every position. Far too costly for production (see bench/route_cost.py); the scores are the definition
the production scorer (mole_trainer.infer.scoring.score_encoded) must reproduce.
"""

from __future__ import annotations


def score_encoded_reference(model, prompts: list[dict], label_ids: list[list[int]], pad_id: int):
    """Log-probability matrix [n, K] of each label after each encoded prompt (K rows per prompt)."""
    import torch

    from mole_trainer.data.preprocess import collate

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
