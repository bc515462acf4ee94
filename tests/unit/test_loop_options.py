"""The loop's GPU-minded options on the CPU: AdamW choice, loading processes, logging, length grouping."""

import random
import sys

import pytest
import torch

from mole_trainer.config import TrainSpec
from mole_trainer.train.loop import BatchStream, make_optimizer
from mole_trainer.train.router import class_weights

from .test_train_loop import SPEC, run


def _same_training(a, b) -> None:
    (ma, ra), (mb, rb) = a, b
    for x, y in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(x, y)
    assert ra.log == rb.log


def test_cpu_adamw_gives_bit_identical_weights_to_torchs_default():
    def train(make):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(300))]
        optim = make(params)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optim.step()
        return params

    spec = TrainSpec(lr=1e-2, weight_decay=0.01)
    ours = train(lambda ps: make_optimizer(ps, spec, torch.device("cpu")))
    default = train(lambda ps: torch.optim.AdamW(ps, lr=spec.lr, weight_decay=spec.weight_decay))
    for a, b in zip(ours, default, strict=True):
        assert torch.equal(a, b)


def test_loading_processes_train_the_same_and_resume_exactly(tmp_path):
    """Two workers prefetching 3 batches each run the stream ahead of training; a checkpoint must
    still record the position after the last batch trained on."""
    loaded = TrainSpec(**{**SPEC.__dict__, "data_workers": 2, "prefetch_batches": 3})
    ref = run(tmp_path / "ref")  # batches built in the training process (the CPU default)
    _same_training(run(tmp_path / "workers", spec=loaded), ref)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", spec=loaded, crash_at_eval=3)
    # resumed in process: the worker count is not part of what a checkpoint must match
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed[1].resumed_from == 5
    _same_training(resumed, ref)


def test_the_host_reads_the_loss_only_at_log_steps(tmp_path, monkeypatch):
    """No `.item()` per micro-batch (each one would wait for the GPU): one per log entry."""
    calls = {"n": 0}
    item = torch.Tensor.item

    def counted(self):
        # torch's own CPU-side reads (AdamW's step counters live on the host) are not ours to count
        calls["n"] += sys._getframe(1).f_globals.get("__name__", "").startswith("mole_trainer")
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    spec = TrainSpec(**{**SPEC.__dict__, "grad_accum": 3})
    _, result = run(tmp_path, spec=spec)
    assert calls["n"] == sum("train_loss" in e for e in result.log) == 4  # steps 3, 6, 9, 10


def test_log_every_adds_train_loss_entries_and_changes_nothing_else(tmp_path):
    model, base = run(tmp_path / "plain")
    logged_model, logged = run(tmp_path / "logged", spec=TrainSpec(**{**SPEC.__dict__, "log_every": 2}))
    assert [e["step"] for e in logged.log] == [0, 2, 3, 4, 6, 8, 9, 10]
    assert [e for e in logged.log if "val_loss" in e] == base.log
    assert all(set(e) == {"step", "train_loss", "lr"} for e in logged.log if e["step"] in (2, 4, 8))
    for a, b in zip(model.parameters(), logged_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _padded(batches, lengths) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_pads_less_and_covers_every_index_once_per_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(64)]
    grouped = BatchStream(64, 4, seed=0, lengths=lengths, group=8)
    plain = BatchStream(64, 4, seed=0)
    for _ in range(2):  # two epochs
        epoch = [next(grouped) for _ in range(16)]
        assert sorted(i for b in epoch for i in b) == list(range(64))
        assert _padded(epoch, lengths) < 0.8 * _padded([next(plain) for _ in range(16)], lengths)
    again = BatchStream(64, 4, seed=7, lengths=lengths, group=8)
    again.load_state_dict(grouped.state_dict())
    assert [next(again) for _ in range(20)] == [next(grouped) for _ in range(20)]


def test_weighted_length_grouping_keeps_the_class_balance():
    experts = ["a"] * 90 + ["b"] * 10
    lengths = [10 + (i * 37) % 300 for i in range(100)]
    s = BatchStream(100, 10, seed=0, weights=class_weights(experts), lengths=lengths, group=4)
    batches = [next(s) for _ in range(200)]
    drawn = [experts[i] for b in batches for i in b]
    assert abs(drawn.count("b") / len(drawn) - 0.5) < 0.05
    plain = BatchStream(100, 10, seed=0, weights=class_weights(experts))
    assert _padded(batches, lengths) < 0.8 * _padded([next(plain) for _ in range(200)], lengths)


def test_length_grouped_training_resumes_exactly(tmp_path):
    grouped = TrainSpec(**{**SPEC.__dict__, "length_grouping": 2})
    ref = run(tmp_path / "ref", spec=grouped)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", spec=grouped, crash_at_eval=3)
    _same_training(run(tmp_path / "cut", spec=grouped, resume=True), ref)


def test_new_settings_are_validated():
    assert set(
        TrainSpec(log_every=-1, data_workers=-1, prefetch_batches=0, length_grouping=1).problems()
    ) == {
        "log_every",
        "data_workers",
        "prefetch_batches",
        "length_grouping",
    }
    assert not TrainSpec(data_workers=None, length_grouping=2).problems()
