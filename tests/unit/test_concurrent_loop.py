"""train_concurrent on the tiny model, in process: loaders, length grouping, host reads, resume rules."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from mole_trainer.config import LorasConfig, LoraSpec, TrainSpec
from mole_trainer.errors import UserError
from mole_trainer.train import checkpoint as ckpt
from mole_trainer.train.concurrent import ExpertRun, concurrent_checkpoints, resume_settings, train_concurrent
from mole_trainer.train.loop import BatchStream

LORA = LoraSpec(rank=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj"])  # dropout: the RNG matters
SPECS = [
    TrainSpec(lr=0.01, steps=6, batch_size=2, eval_every=3, warmup_ratio=0.0, save_every=1, seed=1),
    TrainSpec(lr=0.02, steps=4, batch_size=2, eval_every=3, grad_accum=2, warmup_ratio=0.0, seed=2),
]


class Recorded(list):
    """Examples that record which index is read (in the training process: no loading processes)."""

    def __init__(self, items, fail_after: int | None = None):
        super().__init__(items)
        self.read, self.fail_after = [], fail_after

    def __getitem__(self, i):
        if self.fail_after is not None and len(self.read) >= self.fail_after:
            raise KeyboardInterrupt  # stands in for a kill between two checkpoints
        self.read.append(i)
        return super().__getitem__(i)


def _examples(n: int, seed: int) -> list[dict]:
    """Text-only rows of different lengths whose last 3 tokens are supervised."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 400, (6 + (i * 5) % 9,), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[-3:] = ids[-3:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _train(tiny_model, root, specs=SPECS, resume=False, fail_after=None):
    """Train experts (`specs`) together; `fail_after` n validation reads of e0 interrupts the run."""
    from mole_trainer.model.loading import load_base
    from mole_trainer.model.multi_lora import MultiLora, expert_weights_from_spec

    base = load_base(str(tiny_model), "float32", "cpu")
    multi = MultiLora(base, [expert_weights_from_spec(base, LORA, s.seed) for s in specs])
    data = [Recorded(_examples(10, e)) for e in range(len(specs))]
    val = [Recorded(_examples(3, 10 + e), fail_after if e == 0 else None) for e in range(len(specs))]
    runs = [ExpertRun(f"e{e}", data[e], val[e], s) for e, s in enumerate(specs)]
    result = train_concurrent(
        base, multi, runs, 0, lambda *_: None, checkpoint_dir=root, resume=resume, settings={"k": 1}
    )
    weights = [{n: (w.A.clone(), w.B.clone()) for n, w in multi.state(e).items()} for e in range(len(specs))]
    multi.remove()
    return result, weights, data


def _assert_same(a, b) -> None:
    (ra, wa, _), (rb, wb, _) = a, b
    assert [o.log for o in ra.experts] == [o.log for o in rb.experts]
    for x, y in zip(wa, wb, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k][i], y[k][i]) for k in x for i in (0, 1))


def test_loaders_train_alike_and_resume_exactly(tiny_model, tmp_path, monkeypatch):
    from mole_trainer.train import concurrent

    # both experts in one forward pass: joined batches, and equal groups take the bmm path
    monkeypatch.setattr(concurrent, "PAD_SLACK", float("inf"))
    ref = _train(tiny_model, tmp_path / "ref")
    logs = [o.log for o in ref[0].experts]
    assert [e["step"] for e in logs[0]] == [0, 3, 6] and [e["step"] for e in logs[1]] == [0, 3, 4]
    assert all(e["train_loss"] > 0 for log in logs for e in log[1:])

    # two loading processes prefetching 3 batches each: the same training
    loaded = [TrainSpec(**{**s.__dict__, "data_workers": 2, "prefetch_batches": 3}) for s in SPECS]
    _assert_same(_train(tiny_model, tmp_path / "workers", specs=loaded), ref)

    # interrupted at step 3's evaluation (2 reads per evaluation) while the loading processes had
    # batches prefetched beyond step 2's checkpoint; resumed in process: bit for bit the same
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model, tmp_path / "cut", specs=loaded, fail_after=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")][-1] == "step-00000002"
    resumed = _train(tiny_model, tmp_path / "cut", resume=True)
    assert resumed[0].resumed_from == 2
    _assert_same(resumed, ref)

    # checkpoints of an earlier version that cannot be loaded safely: refused, none deleted
    from .test_train_loop import _to_older_format

    folders = ckpt.list_checkpoints(tmp_path / "ref")
    for folder in folders:
        _to_older_format(folder)
    with pytest.raises(UserError, match="older format"):
        _train(tiny_model, tmp_path / "ref", resume=True)
    assert ckpt.list_checkpoints(tmp_path / "ref") == folders


def test_log_every_adds_train_loss_entries(tiny_model, tmp_path):
    specs = [TrainSpec(**{**SPECS[0].__dict__, "log_every": 2})]
    result, _, _ = _train(tiny_model, tmp_path, specs=specs)
    log = result.experts[0].log
    assert [e["step"] for e in log] == [0, 2, 3, 4, 6]
    assert "val_loss" not in log[1] and log[1]["train_loss"] > 0 and "val_loss" in log[2]


def test_length_grouping_draws_the_sequential_loops_batches(tiny_model, tmp_path):
    specs = [TrainSpec(**{**SPECS[0].__dict__, "length_grouping": 2, "steps": 4})]
    _, _, data = _train(tiny_model, tmp_path, specs=specs)
    lengths = [len(x["input_ids"]) for x in list.__iter__(data[0])]
    assert data[0].read[:10] == list(range(10))  # the lengths, read once before training
    drawn = data[0].read[10:]
    stream = BatchStream(len(lengths), 2, specs[0].seed, lengths=lengths, group=2)
    assert drawn == [i for _ in range(4) for i in next(stream)]
    plain = BatchStream(len(lengths), 2, specs[0].seed)
    assert drawn != [i for _ in range(4) for i in next(plain)]


def test_resume_settings_leave_out_what_does_not_change_the_weights(tmp_path):
    (tmp_path / "prep").mkdir()
    cfg = LorasConfig(base_model="base")
    weights = [{"m": SimpleNamespace(A=torch.zeros(2, 3), B=torch.zeros(3, 2))}]

    def settings(**change):
        spec = TrainSpec(**{**SPECS[0].__dict__, **change})
        job = SimpleNamespace(name="e0", spec=spec, lora=LORA, train_examples=[1], val_examples=[1])
        job.prep = tmp_path / "prep"
        return resume_settings(cfg, [job], weights)

    saved = settings()
    assert settings(log_every=5, data_workers=2, prefetch_batches=4) == saved
    # a checkpoint that recorded them (written before they were left out) still resumes
    older = {"settings": {**saved, "e0.log_every": 0, "e0.data_workers": None}}
    ckpt.check_resumable(older, settings(log_every=5, data_workers=2), tmp_path)
    with pytest.raises(UserError, match=r"e0\.lr: 0\.01 -> 0\.5"):
        ckpt.check_resumable({"settings": saved}, settings(lr=0.5), tmp_path)


def test_joined_batches_equal_one_collate_of_all_rows():
    from mole_trainer.data.preprocess import collate, concat_batches

    rows = _examples(7, 3)
    for i in (1, 4, 5):  # rows with an image: patches are concatenated in row order
        rows[i] = {
            **rows[i],
            "pixel_values": torch.full((4, 3), float(i)),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        }
    parts = [rows[:2], rows[2:3], rows[3:]]
    joined = concat_batches([collate(p, 7) for p in parts], 7)
    whole = collate(rows, 7)
    assert joined.keys() == whole.keys() and all(torch.equal(joined[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="different fields"):
        concat_batches([collate(rows[:1], 7), {"input_ids": torch.zeros(1, 3, dtype=torch.long)}], 7)


def test_the_host_reads_losses_only_at_log_steps(tiny_model, tmp_path, monkeypatch):
    from torch.overrides import TorchFunctionMode

    from mole_trainer.train import concurrent

    monkeypatch.setattr(concurrent, "PAD_SLACK", float("inf"))  # one pass: the bmm path too
    reads, built = {"n": 0}, []

    class Watched(torch.Tensor):
        """The loop's loss accumulator: counts its reads back to the host."""

        def tolist(self):
            reads["n"] += 1
            return super().tolist()

        def item(self):
            reads["n"] += 1
            return super().item()

    class Spies(TorchFunctionMode):
        """Sees every torch call of the run without replacing a torch function: torch caches some by
        identity (the factories that `with torch.device(...)` redirects), so a torch.zeros or torch.tensor
        swapped for a spy would outlive the test and leave later loaded models half initialised."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if func is torch.tensor and "device" in kwargs and caller.startswith("mole_trainer"):
                # torch.tensor(data, device=cuda) waits for the GPU; host data must be copied non-blocking
                built.append(caller)
            out = func(*args, **kwargs)
            if func is torch.zeros and caller == "mole_trainer.train.concurrent":
                out = out.as_subclass(Watched)  # the loop's loss accumulator
            return out

    with Spies():
        _train(tiny_model, tmp_path / "counted")
    # one read per step where some expert logs (3: both evaluate, 4: e1's last, 6: e0's last), not per step
    assert reads["n"] == 3 and built == []


def test_joint_checkpoint_folders_keep_their_names_across_versions(tmp_path):
    joint = tmp_path / ".concurrent"
    assert concurrent_checkpoints(tmp_path, ["ocr", "chart-screen"]) == joint / "ocr+chart-screen"
    # names unfit for a folder, or too long together, give a short key of the names in order; these
    # are the keys earlier versions wrote, so their checkpoints are still found by --resume
    assert concurrent_checkpoints(tmp_path, ["my expert", "b"]) == joint / "e8357cb6bd21d15a"
    assert concurrent_checkpoints(tmp_path, ["x" * 70, "y" * 70]) == joint / "8f8a0d29503459db"
    assert concurrent_checkpoints(tmp_path, ["b", "my expert"]) != joint / "e8357cb6bd21d15a"


def test_an_expert_that_stops_improving_leaves_with_its_best_weights(tiny_model, tmp_path):
    from mole_trainer.model.loading import load_base
    from mole_trainer.model.multi_lora import expert_weights_from_spec

    # e1 can never beat its step-0 validation loss by min_delta: one evaluation without improvement
    # (patience 1, at step 3) stops it; e0 trains on alone to its own step count
    stops = TrainSpec(**{**SPECS[1].__dict__, "steps": 9, "patience": 1, "min_delta": 100.0})
    result, weights, _ = _train(tiny_model, tmp_path, specs=[SPECS[0], stops])
    e0, e1 = result.experts
    assert (e1.stopped_early, e1.steps, e1.best_step) == (True, 3, 0)
    assert [e["step"] for e in e1.log] == [0, 3]
    assert e1.samples_seen == 3 * stops.grad_accum * stops.batch_size  # no batch drawn after it left
    assert (e0.stopped_early, e0.steps, result.steps) == (False, 6, 6)
    # its best weights are those it started from, loaded back over the ones it trained to
    start = expert_weights_from_spec(load_base(str(tiny_model), "float32", "cpu"), LORA, stops.seed)
    assert weights[1].keys() == start.keys()
    assert all(
        torch.equal(weights[1][n][0], w.A) and torch.equal(weights[1][n][1], w.B) for n, w in start.items()
    )
