"""The history you can look at: backfill of past runs (real file formats), report and plots, compare,
device/cost/git recording, the JSONL history of shared Volumes, and concurrent writers."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import subprocess
from pathlib import Path

import pytest

from mole_trainer.cli import main
from mole_trainer.errors import UserError
from mole_trainer.history import History, open_history, record_run
from mole_trainer.history_backfill import find_runs
from mole_trainer.history_files import FileHistory, machine_id
from mole_trainer.history_report import FIGURES
from mole_trainer.history_view import read_history
from mole_trainer.layout import (
    EXPERT_INFO_FILE,
    HISTORY_DB,
    HISTORY_DIR,
    LOCK_SHARED_ENV,
    ROUTER_INFO_FILE,
    TENSORBOARD_DIR,
    TRAIN_LOG_FILE,
)
from mole_trainer.runinfo import hourly_rate, load_prices, price_key

from ..helpers import png_has_drawing, report_images

EXPERTS = {"calendar": ("click_score", 0.0), "ocr": ("char_similarity", 0.05)}
LABELS = ["calendar", "chart-screen", "login-window", "ocr"]


def _log(path: Path, steps: list[int], accuracy: bool) -> int:
    """A train_log.jsonl as train/loop.py writes it; returns the number of numeric values (metric rows)."""
    lines, values = [], 0
    for i, step in enumerate(steps):
        entry = {"step": step, "val_loss": 5.0 / (i + 1)}
        if step:
            entry.update(train_loss=6.0 / (i + 1), lr=0.003 * (1 - i / len(steps)))
        if accuracy:
            entry["val_accuracy"] = 0.2 + 0.1 * i
        lines.append(json.dumps(entry))
        values += len(entry) - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return values


def _eval_report(path: Path, accuracy: float) -> None:
    """A `mole eval router` report (eval/router_eval.py's keys)."""
    matrix = [[5, 1, 0, 0], [0, 6, 0, 0], [0, 0, 6, 0], [1, 0, 0, 5]]
    bins = [
        {"lo": i / 10, "hi": (i + 1) / 10, "count": 0, "confidence": None, "accuracy": None}
        for i in range(10)
    ]
    bins[7].update(count=4, confidence=0.75, accuracy=0.5)
    bins[9].update(count=20, confidence=0.97, accuracy=1.0)
    report = {
        "n": 24,
        "accuracy": accuracy,
        "top_k": {"1": accuracy, "2": 1.0},
        "per_expert": {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 6} for n in LABELS},
        "macro_f1": accuracy - 0.01,
        "confusion": {"labels": LABELS, "matrix": matrix},
        "calibration": {"ece": 0.04, "brier": 0.1, "nll": 0.2, "bins": bins},
        "consistency": {
            "batch_invariance": 1.0,
            "perturbations": {"jpeg": 1.0, "resize": 0.96, "punctuation": 0.92},
            "perturbation_mean": 0.96,
        },
        "checkpoint": "ckpt/router",
        "adapter_sha256": "ab" * 32,
        "test_data": "data/routing/routing_data.jsonl",
        "split": "test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def _trainer_state(path: Path, last_step: int) -> int:
    """A transformers Trainer trainer_state.json; returns its number of metric values."""
    history = []
    for step in range(10, last_step + 1, 10):
        history.append(
            {"epoch": step / 100, "grad_norm": 1.5, "learning_rate": 1e-4, "loss": 2.0 / step, "step": step}
        )
        history.append({"epoch": step / 100, "eval_loss": 3.0 / step, "eval_runtime": 0.5, "step": step})
    history.append(
        {"epoch": 0.2, "step": last_step, "train_runtime": 42.0, "total_flos": 1e12, "train_loss": 0.3}
    )
    state = {"best_metric": 0.15, "epoch": last_step / 100, "global_step": last_step, "log_history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    return 5 * (last_step // 10) + 1  # per logged step 3 training + 2 eval values; train_loss once


@pytest.fixture(scope="module")
def past(tmp_path_factory) -> dict:
    """A folder of past runs in every format backfill reads, and how many metric rows each holds."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("past")
    rows = {}
    router = root / "ckpt/router"
    rows["router"] = _log(router / TRAIN_LOG_FILE, [0, 2, 4, 6], accuracy=True)
    info = {"adapter": str(router / "adapter"), "steps": 6, "best_step": 6, "train_seconds": 12.5}
    info["best"] = {"val_loss": 1.25, "val_accuracy": 0.5}
    (router / ROUTER_INFO_FILE).write_text(json.dumps(info))
    writer = SummaryWriter(str(router / TENSORBOARD_DIR))  # as train/loop.py writes it: the log says the same
    for entry in map(json.loads, (router / TRAIN_LOG_FILE).read_text().splitlines()):
        writer.add_scalar("val_loss", entry["val_loss"], entry["step"])
    writer.close()
    for name, (metric, base) in EXPERTS.items():
        out = root / "ckpt/experts" / name
        rows[name] = _log(out / TRAIN_LOG_FILE, [0, 2, 4], accuracy=False)
        expert = {"expert": name, "adapter": str(out / "adapter"), "metric": metric, "value": base + 0.3}
        expert.update(base_value=base, best_val_loss=1.6, train_seconds=8.0, steps=4)
        (out / EXPERT_INFO_FILE).write_text(json.dumps(expert))
    _eval_report(root / "eval/router_report.json", 0.8)
    _eval_report(root / "eval-later/router_report.json", 0.9)
    writer = SummaryWriter(str(root / "tb-only"))
    for step in range(5):
        writer.add_scalar("loss/train", 1.0 / (step + 1), step)
        writer.add_scalar("accuracy", 0.1 * step, step)
    writer.close()
    rows["tensorboard"] = 10
    _trainer_state(root / "hf-run/checkpoint-10/trainer_state.json", 10)
    rows["trainer_state"] = _trainer_state(root / "hf-run/checkpoint-20/trainer_state.json", 20)
    (root / "notes-report.json").write_text('{"title": "not an eval report"}')
    return {"root": root, "rows": rows}


@pytest.fixture(scope="module")
def backfilled(past, tmp_path_factory) -> dict:
    """A work directory whose history holds the past runs (backfilled twice)."""
    wd = tmp_path_factory.mktemp("wd")
    first = _backfill(wd, past["root"])
    second = _backfill(wd, past["root"])
    return {"wd": wd, "first": first, "second": second}


def _backfill(wd: Path, root: Path) -> str:
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(["--workdir", str(wd), "history", "backfill", str(root)]) == 0
    return out.getvalue()


def test_backfill_imports_every_format_once(past, backfilled):
    wd, rows = backfilled["wd"], past["rows"]
    expected_rows = sum(rows.values())
    assert re.search(
        rf"7 runs found .*: 7 added, 0 already .* {expected_rows} metric rows added", backfilled["first"]
    )
    assert re.search(r"7 runs found .*: 0 added, 7 already .* 0 metric rows added", backfilled["second"])
    data = read_history(wd)
    assert len(data.runs) == 7 and len(data.metrics) == expected_rows
    stages = sorted(r["stage"] for r in data.runs)
    assert stages == [
        "eval.router",
        "eval.router",
        "train",
        "train",
        "train.experts",
        "train.experts",
        "train.router",
    ]
    router = next(r for r in data.runs if r["stage"] == "train.router")
    assert router["metrics"]["val_accuracy"] == 0.5 and router["duration_s"] == 12.5
    assert [v for _, v in data.series(router["run_id"])["val_accuracy"]] == pytest.approx(
        [0.2, 0.3, 0.4, 0.5]
    )
    ocr = next(r for r in data.runs if "ocr" in (r["artifacts"] or {}))
    assert ocr["metrics"]["ocr.char_similarity"] == pytest.approx(0.35)
    assert set(data.series(ocr["run_id"])) == {"ocr/val_loss", "ocr/train_loss", "ocr/lr"}
    hf = next(r for r in data.runs if r["source"].endswith("hf-run"))  # the newest checkpoint's state only
    assert hf["metrics"]["global_step"] == 20 and max(s for s, _ in data.series(hf["run_id"])["loss"]) == 20
    tb = next(r for r in data.runs if r["source"].endswith("tb-only"))
    assert [v for _, v in data.series(tb["run_id"])["loss/train"]] == pytest.approx(
        [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]
    )


def test_backfill_attaches_curves_to_the_run_that_recorded_them(past, tmp_path):
    adapter = str(past["root"] / "ckpt/router/adapter")
    with record_run(tmp_path / HISTORY_DB, "train.router", {}) as run:
        run.artifacts["adapter"] = adapter  # recorded live, before curves were kept
    _backfill(tmp_path, past["root"])
    data = read_history(tmp_path)
    assert [r["run_id"] for r in data.runs if r["stage"] == "train.router"] == [run.run_id]
    assert len(data.series(run.run_id)["val_loss"]) == 4


def test_backfill_of_a_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "history", "backfill", str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_backfill_lists_a_broken_log_line_and_keeps_the_rest(tmp_path):
    out = tmp_path / "run"
    _log(out / TRAIN_LOG_FILE, [0, 2], accuracy=True)
    with (out / TRAIN_LOG_FILE).open("a") as fh:
        fh.write('{"step": "x"}\n{"val_loss": 1}\n')
    found, problems = find_runs(tmp_path)
    assert len(found) == 1 and len(found[0].rows) == 6  # 2 at step 0, 4 at step 2
    assert [p.split(": ")[0] for p in problems] == [f"{out / TRAIN_LOG_FILE}:3", f"{out / TRAIN_LOG_FILE}:4"]


@pytest.mark.slow  # seconds: left out of make test-fast
def test_report_is_one_self_contained_page_with_every_figure(backfilled, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    assert main(["--workdir", str(backfilled["wd"]), "history", "report", "--output", str(out)]) == 0
    assert f"wrote {out} (7 runs, {len(FIGURES)} figures)" in capsys.readouterr().out
    page = out.read_text()
    images = report_images(page, FIGURES)
    assert {name: png_has_drawing(png) for name, png in images.items()} == dict.fromkeys(FIGURES, True)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page  # no network
    assert page.count("<tr>") == 1 + 7  # the runs table: header + one row per run


def test_plot_writes_the_figures_of_one_run(backfilled, tmp_path, capsys):
    wd = backfilled["wd"]
    newest_eval = next(r for r in read_history(wd).runs if r["stage"] == "eval.router")
    assert (
        main(
            [
                "--workdir",
                str(wd),
                "history",
                "plot",
                "--run",
                newest_eval["run_id"][:9],
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion.png",
        "consistency.png",
        "reliability.png",
    ]
    assert all(png_has_drawing(p.read_bytes()) for p in tmp_path.iterdir())
    assert main(["--workdir", str(wd), "history", "plot", "--run", "zzz", "--output-dir", str(tmp_path)]) == 2
    assert "no run with id 'zzz'" in capsys.readouterr().err


def test_compare_shows_what_changed(backfilled, capsys):
    wd = backfilled["wd"]
    evals = [r for r in read_history(wd).runs if r["stage"] == "eval.router"]
    older, newer = sorted(evals, key=lambda r: r["metrics"]["accuracy"])
    assert main(["--workdir", str(wd), "history", "compare", older["run_id"], newer["run_id"], "--json"]) == 0
    rows = {r["field"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["metrics.accuracy"]["change"] == "+0.1"
    assert rows["metrics.top2"]["change"] == "+0"
    assert "metrics.confusion.matrix" not in rows  # matrices are figures, not text
    assert main(["--workdir", str(wd), "history", "show", "--run", older["run_id"]]) == 0
    assert "accuracy = 0.8" in capsys.readouterr().out


def test_a_run_records_git_device_and_cost(tmp_path):
    db = tmp_path / HISTORY_DB
    with record_run(db, "data.synth", {}) as rec:
        pass
    run = History(db).get(rec.run_id)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert run["git_commit"] == head.stdout.strip() and isinstance(run["git_dirty"], bool)
    cores = len(os.sched_getaffinity(0))
    assert run["device"] == f"cpu:{cores}"  # no torch GPU in this process: priced per core
    per_core = load_prices()["cpu_core_per_hour"]
    assert run["cost_usd"] == pytest.approx(run["duration_s"] / 3600 * per_core * cores, abs=1e-6)

    (tmp_path / "config").mkdir()
    (tmp_path / "config/prices.yaml").write_text("cpu_core_per_hour: 3600\ngpu_per_hour: {RTX-4090: 0.5}\n")
    with record_run(db, "data.synth", {}) as rec:
        pass
    run = History(db).get(rec.run_id)
    assert run["cost_usd"] == pytest.approx(run["duration_s"] * cores, abs=1e-5)
    (tmp_path / "config/prices.yaml").write_text("gpu_per_hour: {H100: cheap}\n")
    with pytest.raises(UserError, match=r"prices.yaml: gpu_per_hour.H100: expected a price"):
        record_run(db, "data.synth", {}).__enter__()


@pytest.mark.parametrize(
    ("device", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("Tesla T4", "T4"),
        ("NVIDIA H200", None),  # not in the table: no cost rather than a wrong one
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA L40", None),  # a whole-name match: not an L4
        ("cpu", "cpu"),
    ],
)
def test_price_key_matches_whole_device_names(device, key):
    prices = load_prices()
    assert price_key(device, prices) == key
    assert (hourly_rate(device, 2, prices) is None) == (key is None)


def test_shared_volume_history_is_jsonl_per_writer_and_merges_with_sqlite(tmp_path, monkeypatch):
    db = tmp_path / HISTORY_DB
    with record_run(db, "data.synth", {"local": True}):
        pass
    monkeypatch.setenv(LOCK_SHARED_ENV, "1")
    assert isinstance(open_history(db), FileHistory)
    out = str((tmp_path / "ckpt").resolve())
    other = FileHistory(tmp_path / HISTORY_DIR)
    stale = other.start("train.router", {}, output=out)
    with record_run(
        db,
        "train.router",
        {},
        output=tmp_path / "ckpt",
        resume=True,
        taken_over=[{"host": other.get(stale)["host"], "pid": os.getpid()}],
    ) as rec:
        rec.add_metric_rows([(1, "train_loss", 0.5), (2, "train_loss", 0.25)])
    with pytest.raises(RuntimeError), record_run(db, "eval.router", {}):
        raise RuntimeError("boom")
    assert len(list((tmp_path / HISTORY_DIR).glob("*.jsonl"))) == 3  # one file per writer
    data = read_history(tmp_path)
    by_stage = {r["stage"]: r for r in data.runs}
    assert by_stage["data.synth"]["config"] == {"local": True}  # from the SQLite file
    runs = {r["run_id"]: r for r in data.runs}
    assert runs[stale]["status"] == "interrupted" and "stopped renewing" in runs[stale]["error"]
    assert runs[rec.run_id]["resumed_from"] == stale and runs[rec.run_id]["status"] == "ok"
    assert data.series(rec.run_id) == {"train_loss": [(1, 0.5), (2, 0.25)]}
    assert (
        by_stage["eval.router"]["status"] == "failed"
        and by_stage["eval.router"]["error"] == "RuntimeError: boom"
    )
    with (sorted((tmp_path / HISTORY_DIR).glob("*.jsonl"))[-1]).open("a") as fh:
        fh.write('{"kind": "run", "ru')  # a writer killed mid-line: the rest still reads
    assert len(read_history(tmp_path).runs) == 4


def test_sqlite_and_files_record_a_run_alike(tmp_path):
    """start/finish are written once (history_writer.RunWriter): both stores read back the same run."""
    got = []
    machines = []
    for history in (History(tmp_path / HISTORY_DB), FileHistory(tmp_path / HISTORY_DIR)):
        run_id = history.start("train.router", {"out": tmp_path / "o", "lr": 1e-3}, "sha", "out/r", "prev")
        history.finish(run_id, "failed", {"acc": 0.5}, {"dir": tmp_path}, "boom", None, "H100:1", 3600.0)
        run = history.get(run_id)
        assert run["cost_usd"] == pytest.approx(run["duration_s"]) and run["finished_at"] > run["started_at"]
        machines.append(run.pop("machine", None))  # the files alone record it (to reconcile dead runs)
        got.append(
            {
                k: v
                for k, v in run.items()
                if k not in ("id", "run_id", "started_at", "finished_at", "duration_s", "cost_usd")
            }
        )
    assert got[0] == got[1]
    assert machines[0] is None and machines[1] == machine_id()
    assert got[0]["config"] == {"out": str(tmp_path / "o"), "lr": 1e-3} and got[0]["device"] == "H100:1"
    assert (got[0]["status"], got[0]["error"], got[0]["resumed_from"]) == ("failed", "boom", "prev")


def _write_rows(kind: str, target: str, tag: str, n: int) -> None:
    history = History(target) if kind == "sqlite" else FileHistory(target)
    run_id = history.start(f"proc.{tag}", {})
    for step in range(n):
        history.add_metrics(run_id, [(step, "loss", step / n)])
    history.finish(run_id)


@pytest.mark.parametrize("kind", ["sqlite", "files"])
def test_four_writers_of_500_metric_rows_lose_nothing(kind, tmp_path):
    target = str(tmp_path / (HISTORY_DB if kind == "sqlite" else HISTORY_DIR))
    if kind == "sqlite":
        History(target)  # the schema exists before the writers race
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rows, args=(kind, target, str(i), 500)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = read_history(tmp_path)
    assert sorted(r["stage"] for r in data.runs) == [f"proc.{i}" for i in range(4)]
    assert all(r["status"] == "ok" for r in data.runs)
    for run in data.runs:
        assert data.series(run["run_id"])["loss"] == [(s, s / 500) for s in range(500)]


def test_a_training_stores_its_curve_even_when_it_fails_and_never_an_older_log(tmp_path):
    from mole_trainer.stages import _curves

    log, old = tmp_path / "router" / TRAIN_LOG_FILE, tmp_path / "other" / TRAIN_LOG_FILE
    _log(old, [0, 2], accuracy=False)
    os.utime(old, (1_000_000_000, 1_000_000_000))  # left by an earlier run
    db = tmp_path / HISTORY_DB
    with (
        pytest.raises(RuntimeError),
        record_run(db, "train.router", {}) as run,
        _curves(run, {"": log, "o/": old}),
    ):
        _log(log, [0, 2], accuracy=True)
        raise RuntimeError("killed at step 3")
    data = read_history(tmp_path)
    assert data.runs[0]["status"] == "failed"
    assert data.series(run.run_id) == {
        "lr": [(2, 0.0015)],
        "train_loss": [(2, 3.0)],
        "val_accuracy": [(0, 0.2), (2, pytest.approx(0.3))],
        "val_loss": [(0, 5.0), (2, 2.5)],
    }


def test_a_gpu_run_is_recorded_with_its_gpu_and_priced_per_gpu(monkeypatch):
    """No GPU here: a stand-in for torch's CUDA queries (what detect_device reads) checks the path."""
    import sys
    import types

    from mole_trainer.runinfo import detect_device, device_label

    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        current_device=lambda: 0,
        get_device_name=lambda index: "NVIDIA H100 80GB HBM3",
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: rank 0 records for both GPUs
    prices = load_prices()
    assert detect_device() == ("NVIDIA H100 80GB HBM3", 2)
    assert device_label(*detect_device(), prices) == "H100:2"
    assert hourly_rate(*detect_device(), prices) == pytest.approx(2 * prices["gpu_per_hour"]["H100"])
    cuda.is_initialized = lambda: False  # torch imported, CUDA never used: a CPU run
    assert detect_device()[0] == "cpu"


def test_git_state_names_the_checkout_that_tracks_the_code(tmp_path, monkeypatch):
    from mole_trainer.runinfo import GIT_COMMIT_ENV, git_state

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True)

    git("init", "-q")
    for pkg in ("tracked", "venv"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / ".gitignore").write_text("venv/\n")  # a package installed into the repository's .venv
    git("add", ".gitignore", "tracked/__init__.py")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert git_state(str(tmp_path / "tracked")) == (head, False)
    assert git_state(str(tmp_path / "venv")) == (None, None)
    (tmp_path / "tracked/__init__.py").write_text("x = 1\n")
    assert git_state.__wrapped__(str(tmp_path / "tracked")) == (head, True)
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123-dirty")  # a Modal image: no .git, the commit it was built from
    assert git_state.__wrapped__(str(tmp_path / "venv")) == ("abc123", True)


def test_a_history_error_while_storing_curves_never_hides_the_training_error(tmp_path, monkeypatch, caplog):
    import sqlite3

    from mole_trainer.history import RunRecord
    from mole_trainer.stages import _curves

    log = tmp_path / TRAIN_LOG_FILE

    def locked(self, rows):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(RunRecord, "add_metric_rows", locked)
    run = RunRecord(run_id="r1")
    with pytest.raises(RuntimeError, match="CUDA out of memory"), _curves(run, {"": log}):
        _log(log, [0, 2], accuracy=False)
        raise RuntimeError("CUDA out of memory")
    assert "could not store the training curves of run r1: database is locked" in caplog.text
    with pytest.raises(sqlite3.OperationalError), _curves(run, {"": log}):  # a training that succeeded
        _log(log, [0, 2], accuracy=False)


def test_backfill_hashes_event_files_as_streams_with_the_same_run_id(past, tmp_path, monkeypatch):
    import hashlib
    import shutil

    folder = tmp_path / "tb-only"
    shutil.copytree(past["root"] / "tb-only", folder)
    events = sorted(folder.iterdir())
    h = hashlib.sha256(hashlib.sha256(b"tensorboard").digest())
    for path in events:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    expected = "bf-" + h.hexdigest()[:12]  # the id earlier versions gave: a second backfill adds nothing
    real = Path.read_bytes

    def no_whole_event_files(self):
        assert "tfevents" not in self.name, f"{self} read whole into memory"
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", no_whole_event_files)
    found, problems = find_runs(folder)
    assert [f.run["run_id"] for f in found] == [expected] and problems == []
