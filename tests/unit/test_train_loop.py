"""The shared training loop on a toy model: batch stream state, checkpoints, exact resume, TensorBoard."""

import json
from types import SimpleNamespace

import pytest
import torch

from mole_trainer.config import TrainSpec
from mole_trainer.errors import UserError
from mole_trainer.train import checkpoint as ckpt
from mole_trainer.train.loop import BatchStream, batches, lower_is_better, train_loop
from mole_trainer.train.router import class_weights

VOCAB = 11


class ToyBackbone(torch.nn.Module):
    """Embedding and dropout (uses the RNG): the hidden states a causal LM's backbone returns."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.emb.weight.requires_grad_(False)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(last_hidden_state=self.drop(self.emb(input_ids)))


class Toy(torch.nn.Module):
    """A causal-LM-shaped model: a backbone (`model`) and a trainable output head."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = ToyBackbone()
        self.head = torch.nn.Linear(8, VOCAB)

    def get_output_embeddings(self):
        return self.head

    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.head.state_dict(), path / "head.pt")


def examples(n=24):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (3 + i % 4,), generator=g)
        labels = ids.clone()
        labels[0] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


SPEC = TrainSpec(lr=0.05, steps=10, batch_size=4, eval_every=3, warmup_ratio=0.2, save_every=1, seed=3)


def run(tmp_path, spec=SPEC, resume=False, crash_at_eval=None, tb=None, identity=None):
    model, data, calls = Toy(), examples(), {"n": 0}

    def evaluate():
        calls["n"] += 1
        if crash_at_eval is not None and calls["n"] == crash_at_eval:
            raise KeyboardInterrupt  # stands in for a kill between two checkpoints
        with torch.no_grad():
            return {"val_loss": float(model.head.weight.norm())}

    result = train_loop(
        model,
        data,
        spec,
        0,
        evaluate,
        lower_is_better("val_loss", 0.0),
        tmp_path / "log.jsonl",
        tmp_path / "ckpt",
        resume=resume,
        tensorboard_dir=tb,
        identity=identity,
        report=lambda *_: None,
    )
    return model, result


def test_stream_state_round_trip_continues_identically():
    a = BatchStream(10, 3, seed=5)
    for _ in range(4):
        next(a)
    b = BatchStream(10, 3, seed=99)
    b.load_state_dict(a.state_dict())
    assert [next(a) for _ in range(7)] == [next(b) for _ in range(7)]


def test_stream_epochs_cover_every_index_once():
    s = batches(12, 4, seed=0)
    first = sorted(i for _ in range(3) for i in next(s))
    assert first == list(range(12))


def test_weighted_stream_balances_classes():
    experts = ["a"] * 90 + ["b"] * 10
    s = BatchStream(100, 50, seed=0, weights=class_weights(experts))
    drawn = [experts[i] for _ in range(40) for i in next(s)]
    assert abs(drawn.count("b") / len(drawn) - 0.5) < 0.05


def test_resume_after_interruption_is_bit_identical(tmp_path):
    ref, ref_result = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at_eval=3)  # evaluations at steps 0, 3, 6: dies at step 6
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut/ckpt")] == [
        "step-00000004",
        "step-00000005",
    ]
    resumed, result = run(tmp_path / "cut", resume=True)
    assert result.resumed_from == 5
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert result.best_step == ref_result.best_step and result.log == ref_result.log
    lines = (tmp_path / "cut/log.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == ref_result.log


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    first, _ = run(tmp_path)
    again, result = run(tmp_path, resume=True)
    assert result.resumed_from == SPEC.steps and result.steps == SPEC.steps
    assert torch.equal(first.head.weight, again.head.weight)


def test_resume_refuses_changed_settings(tmp_path):
    run(tmp_path)
    changed = TrainSpec(**{**SPEC.__dict__, "lr": 0.01})
    with pytest.raises(UserError, match="lr: 0.05 -> 0.01"):
        run(tmp_path, spec=changed, resume=True)


def test_resume_refuses_another_adapter(tmp_path):
    run(tmp_path, identity={"lora": {"rank": 4}})
    with pytest.raises(UserError, match="lora: {'rank': 4} -> {'rank': 8}"):
        run(tmp_path, resume=True, identity={"lora": {"rank": 8}})


def test_a_best_adapter_moved_aside_by_a_kill_is_put_back(tmp_path):
    old = tmp_path / ckpt.BEST_OLD
    old.mkdir()
    (old / "adapter.bin").write_text("weights")
    (tmp_path / ckpt.BEST_TMP).mkdir()  # the new best was still being written
    ckpt.remove_partial(tmp_path)
    assert (tmp_path / ckpt.BEST_DIR / "adapter.bin").read_text() == "weights"
    assert not old.exists() and not (tmp_path / ckpt.BEST_TMP).exists()


def test_checkpoints_are_pruned_and_temporary_folders_ignored(tmp_path):
    run(tmp_path)
    root = tmp_path / "ckpt"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000009", "step-00000010"]
    (root / ".step-00000011.tmp").mkdir()  # what a kill during a save leaves behind
    state, meta, folder = ckpt.load_latest(root)
    assert folder.name == "step-00000010" and meta["finished"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    run(tmp_path)
    root = tmp_path / "ckpt"
    (root / "step-00000010" / ckpt.STATE_FILE).write_bytes(b"garbage")
    warnings = []
    _, meta, folder = ckpt.load_latest(root, report=warnings.append)
    assert folder.name == "step-00000009" and meta["step"] == 9
    assert "cannot be read" in warnings[0]


def test_fresh_run_clears_the_earlier_runs_checkpoints_best_and_events(tmp_path):
    run(tmp_path, tb=tmp_path / "tb")
    (tmp_path / "ckpt/best").mkdir(exist_ok=True)
    (tmp_path / "ckpt/best/state.json").write_text(json.dumps({"step": 99}))  # an earlier run's best
    short = TrainSpec(**{**SPEC.__dict__, "steps": 2, "eval_every": 5})
    run(tmp_path, spec=short, tb=tmp_path / "tb")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ckpt")] == ["step-00000001", "step-00000002"]
    best = tmp_path / "ckpt/best/state.json"
    assert not best.exists() or json.loads(best.read_text())["step"] <= 2
    assert len(list((tmp_path / "tb").iterdir())) == 1


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result = run(tmp_path, tb=tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val_loss", "train_loss", "lr"} <= set(tags)
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert steps == [e["step"] for e in result.log]
    assert acc.Scalars("train_loss")[-1].value == pytest.approx(result.log[-1]["train_loss"], rel=1e-6)


def test_invalid_checkpoint_settings_are_config_errors():
    assert "keep_checkpoints" in TrainSpec(keep_checkpoints=0).problems()
    assert "save_every" in TrainSpec(save_every=-1).problems()


def test_rng_states_load_with_weights_only_and_replay_every_generator(tmp_path):
    import random

    import numpy as np

    torch.save(ckpt.rng_states(), tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))  # no pickled numpy objects
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def _to_older_format(folder):
    """Rewrite a checkpoint as mole-trainer wrote it before the RNG states became plain lists."""
    import random

    import numpy as np

    state = torch.load(folder / ckpt.STATE_FILE, weights_only=True)
    state["rng"]["python"], state["rng"]["numpy"] = random.getstate(), np.random.get_state()
    torch.save(state, folder / ckpt.STATE_FILE)


def test_resume_from_unreadable_older_checkpoints_refuses_and_deletes_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, crash_at_eval=3)
    root = tmp_path / "ckpt"
    folders = ckpt.list_checkpoints(root)
    for folder in folders:
        _to_older_format(folder)
    with pytest.raises(UserError, match="older format, written by an earlier mole-trainer") as err:
        run(tmp_path, resume=True)
    assert str(root) in str(err.value) and "without --resume" in str(err.value)
    assert ckpt.list_checkpoints(root) == folders  # the interrupted run's progress is still there
    for folder in folders:  # damaged, not older: said so too
        (folder / ckpt.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="the newest fails with"):
        ckpt.load_latest(root, report=lambda *_: None)
    assert ckpt.load_latest(tmp_path / "none") is None
