"""Router scoring: the log-probability of every label after each request, with one prefill per request.

A label's score is the sum of the log-probabilities of its tokens (label + end of turn) after the
router prompt; a softmax over the K labels gives the routing distribution (top-k, calibration and
abstention need a full distribution, not a sample). Two forward passes per batch of requests:

1. Prefill: the router prompts (images + instruction), left-padded, run once with the KV cache on;
   only the last position's logits are computed (`logits_to_keep=1`): they score every label's
   first token. The vision tower sees each image once.
2. Continuation: every label but its last token, all K labels packed into ONE row per request, runs
   over the prompt's cache. A 4-D additive mask lets each label token see the request's non-pad
   prompt and the earlier tokens of its own label only, and explicit M-RoPE positions place every
   label right after the prompt (text position n_real + j, plus the request's rope delta from the
   images), so each packed label is scored exactly as if it alone followed the prompt. The cache is
   neither copied K times nor re-run.

Logits exist only at the label-predicting positions: the prompt's last position, then the packed
label positions through the LM head HEAD_CHUNK at a time (never a [rows, sequence, vocabulary]
tensor); log-probabilities are taken in fp32. M-RoPE positions and rope deltas are
computed per batch from the inputs (model.model.rope_deltas, state shared across calls, is neither
read nor written). The additive float mask serves sdpa and eager attention alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..data.preprocess import collate, encode_prompt, load_images
from ..data.records import Sample
from ..model.chat import end_of_turn
from ..router_prompt import router_messages

MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that accept an arbitrary 4-D additive mask
SCORING_ATTENTION = "sdpa"  # what a model loaded with another implementation scores with
HEAD_CHUNK = 64  # label positions per LM-head call: bounds the fp32 logits to 64 x vocabulary


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


def _causal_lm(model):
    """The Qwen3VLForConditionalGeneration, PEFT-wrapped or not (injected LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _packed_labels(label_ids: list[list[int]]):
    """The continuation row shared by every request: each label without its last token, back to back.

    Returns (input ids, label index, offset in its label, the token each position predicts), as lists.
    """
    ids, owner, offset, target = [], [], [], []
    for k, lab in enumerate(label_ids):
        for j in range(len(lab) - 1):
            ids.append(lab[j])
            owner.append(k)
            offset.append(j)
            target.append(lab[j + 1])
    return ids, owner, offset, target


def score_encoded(
    model,
    prompts: list[dict],
    label_ids: list[list[int]],
    pad_id: int,
    mm_encoder_outputs: dict | None = None,
):
    """Log-probability matrix [n, K] of each label after each encoded prompt (one prefill per prompt).

    `mm_encoder_outputs` ({"image": vision tower output for the prompts' images, in order}) reuses
    image features computed beforehand (the prompts' pixel values are then not run again).
    """
    import torch

    if not prompts:
        return torch.empty(0, len(label_ids))
    if any(not lab for lab in label_ids):
        raise ValueError("every label needs at least one token")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in MASKABLE_ATTENTION:
        raise ValueError(f"router scoring needs {' or '.join(MASKABLE_ATTENTION)} attention, not {attn!r}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(prompts, pad_id, padding_side="left").items()}
    if mm_encoder_outputs is not None:
        batch.pop("pixel_values", None)
        batch["mm_encoder_outputs"] = mm_encoder_outputs
    mask = batch["attention_mask"]
    if "mm_token_type_ids" not in batch:
        batch["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
    positions, deltas = _causal_lm(model).model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=mask,
    )
    with torch.no_grad():
        out = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        scores = first[:, [lab[0] for lab in label_ids]].clone()
        ids, owner, offset, target = _packed_labels(label_ids)
        if ids:
            if out.cache is None or out.cache.get_seq_length() != mask.shape[1]:
                raise RuntimeError(
                    "the router prefill returned no prompt cache (use_cache disabled in training?)"
                )
            scores += _continuation_scores(
                model, out.cache, mask, deltas, ids, owner, offset, target, len(label_ids)
            )
    return scores.cpu()


def _continuation_scores(model, cache, prompt_mask, deltas, ids, owner, offset, target, n_labels):
    """Summed log-probabilities [n, K] of every label token after the first, from the prompt cache."""
    import torch

    device = prompt_mask.device
    n, t = prompt_mask.shape[0], len(ids)
    owner_t = torch.tensor(owner, device=device)
    offset_t = torch.tensor(offset, device=device)
    # a label token sees its own label's earlier tokens (and itself), never another label's
    own = (owner_t[:, None] == owner_t[None, :]) & (offset_t[None, :] <= offset_t[:, None])
    allowed = torch.cat(
        [prompt_mask.bool()[:, None, None, :].expand(n, 1, t, -1), own[None, None].expand(n, 1, t, t)], dim=-1
    )
    base = _causal_lm(model)
    dtype = base.get_input_embeddings().weight.dtype  # the hidden states' dtype (sdpa wants it)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    text_pos = prompt_mask.sum(-1, keepdim=True) + offset_t[None, :]  # [n, t]: right after each prompt
    positions = (text_pos + deltas.to(device)).unsqueeze(0).expand(3, n, t)
    # the inner model gives hidden states only: the LM head then runs on a few positions at a time,
    # so no [n, t, vocabulary] tensor exists (t = 100 label tokens x 8 requests is 0.5 GB at 151,936)
    hidden = base.model(
        input_ids=torch.tensor(ids, device=device).expand(n, t),
        attention_mask=additive,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    ).last_hidden_state.reshape(n * t, -1)
    head = base.get_output_embeddings()
    targets = torch.tensor(target, device=device).repeat(n)
    token_logp = torch.empty(n * t, device=device)
    for i in range(0, n * t, HEAD_CHUNK):
        logits = head(hidden[i : i + HEAD_CHUNK]).float()
        picked = logits.gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0]
        token_logp[i : i + HEAD_CHUNK] = picked - torch.logsumexp(logits, dim=-1)
    token_logp = token_logp.view(n, t)
    per_label = torch.zeros(n, n_labels, device=device)
    per_label.index_add_(1, owner_t, token_logp)
    return per_label


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


@contextmanager
def maskable_attention(model) -> Iterator[None]:
    """Within the block, `model` attends with SCORING_ATTENTION if its own implementation cannot take
    the scorer's 4-D mask (flash_attention_2, e.g. a router trained with it); switched back after.

    Only the implementation name in the configs changes (transformers' set_attn_implementation):
    the weights and any LoRA layers are untouched.
    """
    lm = _causal_lm(model)
    own = getattr(lm.config, "_attn_implementation", None)
    if own in MASKABLE_ATTENTION:
        yield
        return
    lm.set_attn_implementation(SCORING_ATTENTION)
    try:
        if lm.config._attn_implementation != SCORING_ATTENTION:  # transformers only warns when it cannot
            raise ValueError(
                f"{type(lm).__name__} cannot switch from {own!r} to {SCORING_ATTENTION} attention for scoring"
            )
        yield
    finally:
        lm.set_attn_implementation(own)


def encoded_scores(model, prompts: list[dict], label_ids: list[list[int]], pad_id: int, batch_size: int = 8):
    """Label log-probabilities [n, K] for prompts encoded beforehand, `batch_size` prompts per prefill.

    A model loaded with an attention the scorer cannot mask is scored with sdpa (`maskable_attention`).
    """
    import torch

    with maskable_attention(model):
        out = [
            score_encoded(model, prompts[i : i + batch_size], label_ids, pad_id)
            for i in range(0, len(prompts), batch_size)
        ]
    return torch.cat(out) if out else torch.empty(0, len(label_ids))


def encoded_probs(model, prompts: list[dict], label_ids: list[list[int]], pad_id: int, batch_size: int = 8):
    """route_probs for prompts encoded beforehand (a validation set scored at every evaluation)."""
    import torch

    return torch.softmax(encoded_scores(model, prompts, label_ids, pad_id, batch_size), dim=-1)


def label_loss(scores, labels: list[int], label_ids: list[list[int]]) -> float:
    """Mean negative log-probability per token of the true label: the router's teacher-forced loss.

    The router's training examples supervise exactly the label tokens, so this equals the
    cross-entropy of those examples, computed from the scores without a full-vocabulary tensor.
    """
    total = -sum(float(scores[i, y]) for i, y in enumerate(labels))
    tokens = sum(len(label_ids[y]) for y in labels)
    return total / max(tokens, 1)
