"""The answer-only loss equals Hugging Face's full-logits loss: value and LoRA gradients within 1e-5."""

from __future__ import annotations

import pytest
import torch

from mole_trainer.config import LoraSpec
from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import IGNORE_INDEX, collate, encode_sample
from mole_trainer.model.loading import load_base, load_processor
from mole_trainer.model.lora import attach_lora
from mole_trainer.train.loss import (
    answer_loss_sum,
    expert_token_means,
    supervised_count,
    supervised_token_losses,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def batch(tiny_model, synth_data):
    """Four image + chat rows of two experts and different lengths (right padding), labels on answers."""
    processor = load_processor(str(tiny_model), 4096, 20000)
    rows = [
        encode_sample(processor, s, "sft")
        for name in ("calendar", "ocr")
        for s in load_expert_dataset(synth_data / name)["train"][:2]
    ]
    out = collate(rows, processor.tokenizer.pad_token_id)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding is exercised
    return out


@pytest.fixture(scope="module")
def model(tiny_model):
    """A PEFT LoRA on every projection with random A and B (a fresh LoRA has B = 0: no effect, no A grads)."""
    m = attach_lora(load_base(str(tiny_model), "float32", "cpu"), LoraSpec(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = model(**inputs, labels=batch["labels"]).loss
    return loss, _grads(model, loss)


# one piece (seconds: left out of make test-fast), and many recomputed chunks
@pytest.mark.parametrize("chunk", [pytest.param(1024, marks=pytest.mark.slow), 7])
def test_answer_loss_and_gradients_equal_hf_full_logits_loss(model, batch, chunk, monkeypatch):
    import mole_trainer.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_TOKENS", chunk)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    n = supervised_count(labels)
    assert 7 < n < labels[:, 1:].numel()  # answers only, and more than one chunk at chunk=7
    want, want_grads = _hf(model, batch)
    losses, rows = supervised_token_losses(model, inputs, labels)
    assert losses.dtype == torch.float32 and len(losses) == n
    got = answer_loss_sum(model, inputs, labels) / n
    got_grads = _grads(model, got)
    assert abs(got.item() - want.item()) <= TOL * max(1.0, abs(want.item()))
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 0
    for name, g in want_grads.items():
        assert float(g.abs().max()) > 0, name  # every LoRA matrix gets a gradient: the check means something
        torch.testing.assert_close(got_grads[name], g, rtol=TOL, atol=TOL, msg=name)


def test_expert_token_means_equal_hf_loss_of_each_group(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sizes = [1, 3]
    with torch.no_grad():
        got = expert_token_means(model, inputs, batch["labels"], sizes)
        patches = batch["image_grid_thw"].prod(-1).cumsum(0).tolist()  # one image per row
        want, start = [], 0
        for k in sizes:
            part = {key: batch[key][start : start + k] for key in ("input_ids", "attention_mask", "labels")}
            part["mm_token_type_ids"] = batch["mm_token_type_ids"][start : start + k]
            part["image_grid_thw"] = batch["image_grid_thw"][start : start + k]
            first = patches[start - 1] if start else 0
            part["pixel_values"] = batch["pixel_values"][first : patches[start + k - 1]]
            want.append(_hf_loss_only(model, part))
            start += k
    torch.testing.assert_close(got, torch.stack(want), rtol=TOL, atol=TOL)


def _hf_loss_only(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, labels=batch["labels"]).loss


def test_a_row_without_supervised_tokens_adds_nothing(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].clone()
    labels[2] = IGNORE_INDEX
    with torch.no_grad():
        losses, rows = supervised_token_losses(model, inputs, labels)
    assert len(losses) == supervised_count(labels) and 2 not in rows.tolist()
