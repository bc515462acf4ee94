"""The answer-only training loss, shared by the sequential loop, the router and the concurrent path.

The output head (151,936 entries for Qwen3-VL) runs only at the positions whose next token is
supervised (the answers), never over the prompt and image tokens: the base model's backbone gives
the hidden states, the supervised ones are gathered, and the head plus an fp32 cross-entropy run on
them, in chunks of LOSS_CHUNK_TOKENS positions (each chunk's logits recomputed in the backward pass,
so one chunk's logits are alive at a time). The loss and gradients equal Hugging Face's full-logits
loss (tests/unit/test_answer_loss.py holds them to 1e-5).
"""

from __future__ import annotations

from ..data.preprocess import IGNORE_INDEX

# Supervised positions per output-head chunk: at Qwen3-VL's vocabulary a chunk's fp32 logits and
# their gradient take 2 x 1024 x 151,936 x 4 bytes = 1.2 GB; fewer positions run in one piece.
LOSS_CHUNK_TOKENS = 1024


def causal_lm(model):
    """The Hugging Face causal LM inside `model` (a PeftModel's base model, or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone_and_head(model):
    """(backbone giving last_hidden_state, output head) of a causal LM, PEFT-wrapped or not."""
    lm = causal_lm(model)
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise TypeError(f"{type(lm).__name__} has no backbone and output head to compute the answer loss")
    return backbone, head


def _chunk_ce(head, hidden, target):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), target, reduction="none")


def supervised_token_losses(model, batch: dict, labels, chunk: int | None = None):
    """Next-token cross-entropy (fp32) at every supervised position: (losses [n], rows [n]).

    `labels[b, t]` is the token expected at position t (IGNORE_INDEX where not supervised), as in
    `collate`; the loss at position t scores the prediction made from position t - 1. `rows` gives
    each loss's batch row, on the labels' device. Labels left on the host cost the GPU no sync:
    the supervised positions are found there and copied over with the batch.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    chunk = chunk or LOSS_CHUNK_TOKENS
    backbone, head = backbone_and_head(model)
    target = labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    target = target[rows, cols]
    hidden = backbone(**batch).last_hidden_state
    device, width = hidden.device, hidden.shape[1]
    flat = (rows * width + cols).to(device, non_blocking=True)  # position t-1 of row b, in [B * L]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    target = target.to(device, non_blocking=True)
    if len(target) <= chunk:
        return _chunk_ce(head, hidden, target), rows
    parts = [
        checkpoint(_chunk_ce, head, hidden[i : i + chunk], target[i : i + chunk], use_reentrant=False)
        for i in range(0, len(target), chunk)
    ]
    return torch.cat(parts), rows


def answer_loss_sum(model, batch: dict, labels):
    """Summed next-token cross-entropy over the supervised positions (a 0-d fp32 tensor)."""
    losses, _ = supervised_token_losses(model, batch, labels)
    return losses.sum()


def supervised_count(labels) -> int:
    """Number of positions the loss is computed on (labels on the host: no device sync)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def expert_token_means(model, batch: dict, labels, sizes: list[int]):
    """Token-mean answer loss of each row group (an expert's rows, in order), in fp32: [groups]."""
    import torch

    losses, rows = supervised_token_losses(model, batch, labels)
    group_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    owner = group_of_row.to(rows.device)[rows]
    # counted where the labels are (the host): bincount on a GPU reads its input's maximum back
    counts = torch.bincount(owner, minlength=len(sizes)).to(losses.dtype).clamp(min=1.0)
    owner = owner.to(losses.device, non_blocking=True)
    sums = torch.zeros(len(sizes), device=losses.device).index_add(0, owner, losses)
    return sums / counts.to(losses.device, non_blocking=True)


def loss_module(model):
    """`model` inside a module whose forward(batch, labels) returns `answer_loss_sum`.

    Data-parallel training wraps this module, so the forward pass that computes the loss goes
    through DistributedDataParallel (which must see it to reduce the gradients).
    """
    import torch

    class AnswerLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch: dict, labels):
            return answer_loss_sum(self.inner, batch, labels)

    return AnswerLoss(model)
