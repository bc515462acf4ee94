"""`mole train experts --concurrent` gives the same adapters as training each expert alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mole_trainer.cli import main
from mole_trainer.layout import CHECKPOINTS_DIR, EXPERT_INFO_FILE, TRAIN_LOG_FILE

from ..helpers import kill_when

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]}
# lr 1e-3: Adam's first updates are about lr * sign(gradient), so float rounding in near-zero gradient
# components shows up in proportion to lr (about 2e-5 at lr 3e-3, under 1e-6 here, bar 1e-5)
TRAIN = {"lr": 0.001, "steps": 3, "batch_size": 2, "eval_every": 1, "warmup_ratio": 0.0, "patience": 0}
# different batch sizes, step counts, accumulation, clipping and seeds: the rows of the mixed batch
# are unequal at first (segment loop), then ocr leaves and the two equal groups go through bmm
EXPERTS = {
    "calendar": {"train": {"seed": 1}},
    "chart-screen": {"train": {"steps": 4, "grad_accum": 2, "max_grad_norm": 0.05, "seed": 2}},
    "ocr": {"train": {"batch_size": 3, "steps": 2, "lr": 0.01, "seed": 3}},
}


def _config(path: Path, base: Path, out: Path, data: dict[str, Path]) -> Path:
    cfg = {
        "base_model": str(base),
        "output_dir": str(out),
        "image": {"min_pixels": 4096, "max_pixels": 20000},
        "lora": LORA,
        "train": TRAIN,
        "eval_records": 1,
        "experts": {n: {"data": str(data[n]), "max_new_tokens": 2, **e} for n, e in EXPERTS.items()},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.mark.slow
def test_concurrent_equals_sequential(tiny_model, synth_data, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel

    from mole_trainer.model.loading import load_base
    from mole_trainer.model.multi_lora import MultiLoraLinear
    from mole_trainer.stages import train_experts
    from mole_trainer.train import concurrent

    # every active expert in one forward pass, so the mixed paths (segment loop, then bmm) are used
    monkeypatch.setattr(concurrent, "PAD_SLACK", float("inf"))
    seen_groups = []
    forward = MultiLoraLinear.forward

    def spy(self, x):
        seen_groups.append(tuple(self.rows.groups))
        return forward(self, x)

    monkeypatch.setattr(MultiLoraLinear, "forward", spy)

    seq_out, con_out = tmp_path / "seq", tmp_path / "con"
    seq_cfg = _config(tmp_path / "seq.yaml", tiny_model, seq_out, {n: synth_data / n for n in EXPERTS})
    seq = train_experts(seq_cfg, tmp_path, device="cpu", dtype="float32", report=lambda *_: None)
    # the concurrent run reads the sequential run's preprocessed caches: the same examples
    con_cfg = _config(tmp_path / "con.yaml", tiny_model, con_out, {n: seq_out / n / "prep" for n in EXPERTS})
    args = ["--workdir", str(tmp_path), "train", "experts", "--concurrent", "--config", str(con_cfg)]
    assert main([*args, "--device", "cpu", "--dtype", "float32"]) == 0

    for name in EXPERTS:
        a, b = _tensors(seq_out / name / "adapter"), _tensors(con_out / name / "adapter")
        assert a.keys() == b.keys() and len(a) == 2 * 3 * 2  # A and B x 3 modules x 2 layers
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
        moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
        assert moved > 5e-4, f"{name}: B never left zero, the comparison would be empty"
        si = json.loads((seq_out / name / EXPERT_INFO_FILE).read_text())
        ci = json.loads((con_out / name / EXPERT_INFO_FILE).read_text())
        assert (ci["steps"], ci["best_step"]) == (si["steps"], si["best_step"])
        assert ci["best_val_loss"] == pytest.approx(si["best_val_loss"], abs=1e-5)
        assert ci["concurrent"]["experts"] == list(EXPERTS)
        assert (con_out / name / "adapter" / "mole_adapter.json").is_file()
        seq_log = [json.loads(x) for x in (seq_out / name / TRAIN_LOG_FILE).read_text().splitlines()]
        con_log = [json.loads(x) for x in (con_out / name / TRAIN_LOG_FILE).read_text().splitlines()]
        assert [e["step"] for e in con_log] == [e["step"] for e in seq_log]
        for s, c in zip(seq_log, con_log, strict=True):
            assert c["val_loss"] == pytest.approx(s["val_loss"], abs=1e-5)
            assert c.get("train_loss", 0) == pytest.approx(s.get("train_loss", 0), abs=1e-5)
            assert c.get("lr", 0) == pytest.approx(s.get("lr", 0), rel=1e-9)
    assert seq["ocr"]["steps"] == 2 and seq["chart-screen"]["steps"] == 4
    passes = {frozenset(g) for g in seen_groups}  # experts are ordered by length inside a pass
    assert frozenset({(0, 2), (1, 2), (2, 3)}) in passes  # unequal groups: the loop per expert
    assert frozenset({(0, 2), (1, 2)}) in passes  # ocr done: two equal groups, one bmm
    assert frozenset({(1, 2)}) in passes  # chart-screen's second accumulation micro-batch alone

    # an ordinary PEFT adapter: plain PeftModel.from_pretrained loads it
    base = load_base(str(tiny_model), "float32", "cpu")
    model = PeftModel.from_pretrained(base, str(con_out / "ocr" / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == 12 and any(float(v.abs().max()) > 0 for k, v in loaded.items() if "lora_B" in k)
    assert torch.isfinite(next(iter(loaded.values()))).all()
    base = model.unload()

    # the best-so-far checkpoint written during training is the final adapter, in PEFT's own format
    for name in EXPERTS:
        best = con_out / name / CHECKPOINTS_DIR / "best"
        state = json.loads((best / "state.json").read_text())
        assert state["step"] == json.loads((con_out / name / EXPERT_INFO_FILE).read_text())["best_step"]
        final, ckpt = _tensors(con_out / name / "adapter"), _tensors(best)
        assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
        cfg_a = json.loads((best / "adapter_config.json").read_text())
        cfg_b = json.loads((con_out / name / "adapter" / "adapter_config.json").read_text())
        assert cfg_a == cfg_b
        base = PeftModel.from_pretrained(base, str(best)).unload()


# dropout on, so a resume must restore the RNG too; ocr leaves the batch at step 3, calendar goes on;
# calendar's min_delta makes its best step 4 (val loss 7.24, 7.15, 6.68, 6.46 at steps 0, 2, 4, 6), so
# its final adapter is the best weights a checkpoint kept, not its last ones
KILL_TRAIN = {**TRAIN, "steps": 6, "eval_every": 2, "save_every": 1, "keep_checkpoints": 2}
KILL_EXPERTS = {
    "calendar": {"train": {"seed": 1, "lr": 0.01, "min_delta": 0.3}},
    "ocr": {"train": {"steps": 3, "batch_size": 3, "seed": 3}},
}


def _kill_config(path: Path, base: Path, out: Path, data: dict[str, Path]) -> Path:
    cfg = {
        "base_model": str(base),
        "output_dir": str(out),
        "image": {"min_pixels": 4096, "max_pixels": 20000},
        "lora": {**LORA, "dropout": 0.1},
        "train": KILL_TRAIN,
        "eval_records": 1,
        "experts": {n: {"data": str(data[n]), "max_new_tokens": 2, **e} for n, e in KILL_EXPERTS.items()},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_concurrent_sigkill_then_resume_equals_an_uninterrupted_run(
    tiny_model, synth_data, tmp_path, request, capsys
):
    import os
    import random

    import torch

    from mole_trainer.train import checkpoint as ckpt
    from mole_trainer.train.concurrent import concurrent_checkpoints

    def cmd(cfg: Path, *extra: str) -> list[str]:
        return ["--workdir", str(tmp_path), "train", "experts", "--concurrent", "--config", str(cfg), *extra]

    device = ["--device", "cpu", "--dtype", "float32"]
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_cfg = _kill_config(
        tmp_path / "ref.yaml", tiny_model, ref_out, {n: synth_data / n for n in KILL_EXPERTS}
    )
    # one thread everywhere: the killed process and this one must compute bit for bit alike (and on a
    # busy 2-core machine two OpenMP threads per process mostly wait on each other)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run_ok(cfg: Path, *extra: str) -> str:
        assert main([*cmd(cfg, *extra), *device]) == 0
        out = capsys.readouterr()
        return out.out + out.err

    run_ok(ref_cfg)
    # the killed run reads the reference run's preprocessed caches: the same examples
    cut_cfg = _kill_config(
        tmp_path / "cut.yaml", tiny_model, cut_out, {n: ref_out / n / "prep" for n in KILL_EXPERTS}
    )
    ckpts = concurrent_checkpoints(cut_out, list(KILL_EXPERTS))

    # killed as soon as the checkpoint of a random step is complete: before, at or after ocr left
    k = random.Random().randint(2, 4)

    def newest() -> int:
        done = ckpt.list_checkpoints(ckpts)
        return int(done[-1].name.split("-")[1]) if done else 0

    kill_when(["-m", "mole_trainer", *cmd(cut_cfg), *device], lambda: newest() >= k, env)
    killed_at = newest()
    assert k <= killed_at < KILL_TRAIN["steps"], killed_at
    state, meta, _ = ckpt.load_latest(ckpts)  # loads with weights_only=True
    assert [e["name"] for e in meta["experts"]] == list(KILL_EXPERTS) and len(state["experts"]) == 2

    out = run_ok(cut_cfg, "--resume")
    assert f"resuming 2 experts from {ckpts / f'step-{killed_at:08d}'} (step {killed_at})" in out
    # a finished run resumed again (a retry after a crash in final scoring) trains nothing: its
    # adapters come from the best weights in the last checkpoint alone
    for name in KILL_EXPERTS:
        (cut_out / name / "adapter" / "adapter_model.safetensors").unlink()
    out = run_ok(cut_cfg, "--resume")
    assert f"resuming 2 experts from {ckpts / 'step-00000006'} (step 6)" in out
    for name in KILL_EXPERTS:
        ref, cut = _tensors(ref_out / name / "adapter"), _tensors(cut_out / name / "adapter")
        assert ref.keys() == cut.keys() and len(ref) == 12
        for key in ref:
            assert ref[key].equal(cut[key]), f"{name} {key}"
        ref_log = (ref_out / name / TRAIN_LOG_FILE).read_text()
        assert (cut_out / name / TRAIN_LOG_FILE).read_text() == ref_log
        ref_info = json.loads((ref_out / name / EXPERT_INFO_FILE).read_text())
        cut_info = json.loads((cut_out / name / EXPERT_INFO_FILE).read_text())
        for key in ("steps", "best_step", "best_val_loss", "stopped_early", "value"):
            assert cut_info[key] == ref_info[key], key
    assert json.loads((cut_out / "ocr" / EXPERT_INFO_FILE).read_text())["steps"] == 3
    assert json.loads((cut_out / "calendar" / EXPERT_INFO_FILE).read_text())["best_step"] == 4
