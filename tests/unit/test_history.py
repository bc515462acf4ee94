"""Run history in SQLite: round trip, record_run, corrupt files, concurrent writers."""

from __future__ import annotations

import multiprocessing
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mole_trainer import history_writer
from mole_trainer.errors import UserError
from mole_trainer.history import History, format_runs_table, record_run
from mole_trainer.layout import HISTORY_DB, LOCK_SHARED_ENV


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "work" / HISTORY_DB


class SteppedClock(datetime):
    """datetime whose now() starts at 12:00 UTC and moves 90.5 s per call: a run with a known wall time."""

    calls = 0

    @classmethod
    def now(cls, tz=None):
        cls.calls += 1
        return datetime(2026, 1, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=90.5 * (cls.calls - 1))


def test_round_trip(db: Path, monkeypatch):
    monkeypatch.setattr(history_writer, "datetime", SteppedClock)
    monkeypatch.setattr(SteppedClock, "calls", 0)
    history = History(db)
    run_id = history.start("train.experts", {"lr": 1e-4, "out": Path("/x")}, data_hash="abc")
    assert history.get(run_id)["status"] == "running"
    history.finish(run_id, metrics={"loss": 0.5}, artifacts={"ckpt": "a/b"}, cost_usd=1.25)

    run = History(db).get(run_id)
    assert run["stage"] == "train.experts"
    assert run["status"] == "ok"
    assert run["config"] == {"lr": 1e-4, "out": "/x"}
    assert run["data_hash"] == "abc"
    assert run["metrics"] == {"loss": 0.5}
    assert run["artifacts"] == {"ckpt": "a/b"}
    assert run["cost_usd"] == 1.25
    # start reads the clock once, finish once: the duration is the time between them, to the microsecond
    assert (run["started_at"], run["finished_at"]) == (
        "2026-01-01T12:00:00.000000+00:00",
        "2026-01-01T12:01:30.500000+00:00",
    )
    assert run["duration_s"] == 90.5
    assert run["error"] is None and run["host"]


def test_runs_filters_and_order(db: Path):
    history = History(db)
    ids = [history.start(stage, {}) for stage in ("data.routing", "train.experts", "train.router")]
    history.finish(ids[0], "skipped")
    assert [r["run_id"] for r in history.runs()] == ids[::-1]
    assert [r["run_id"] for r in history.runs(stage="train")] == ids[:0:-1]
    assert [r["run_id"] for r in history.runs(stage="train.router")] == [ids[2]]
    assert history.runs(stage="tra") == []
    assert [r["run_id"] for r in history.runs(status="skipped")] == [ids[0]]
    assert len(history.runs(limit=1)) == 1


def test_unknown_run_and_bad_status(db: Path):
    history = History(db)
    with pytest.raises(UserError, match="no run with id"):
        history.get("nope")
    run_id = history.start("x", {})
    with pytest.raises(ValueError):
        history.finish(run_id, "running")


def test_record_run_ok_and_failed(db: Path):
    with record_run(db, "eval.router", {"k": 2}) as rec:
        rec.metrics["accuracy"] = 0.9
        rec.artifacts["report"] = "eval/report.json"
    with pytest.raises(RuntimeError, match="boom"), record_run(db, "train.router", {}) as failing:
        failing.metrics["step"] = 3
        raise RuntimeError("boom")

    history = History(db)
    ok = history.get(rec.run_id)
    assert ok["status"] == "ok" and ok["metrics"] == {"accuracy": 0.9}
    failed = history.get(failing.run_id)
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: boom"
    assert failed["metrics"] == {"step": 3}


def test_record_run_skipped(db: Path):
    with record_run(db, "data.routing", {}) as rec:
        rec.status = "skipped"
    assert History(db).get(rec.run_id)["status"] == "skipped"


def test_not_sqlite_file_is_user_error(tmp_path: Path):
    bad = tmp_path / HISTORY_DB
    bad.write_text("this is not a database\n" * 10)
    with pytest.raises(UserError, match=str(bad)):
        History(bad)
    with pytest.raises(UserError, match="is a folder"):
        History(tmp_path)


def _write_runs(db: str, tag: str, n: int) -> None:
    history = History(db)
    for i in range(n):
        history.finish(history.start(f"proc.{tag}", {"i": i}), metrics={"i": i})


def test_two_processes_write(db: Path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_runs, args=(str(db), tag, 20)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    runs = History(db).runs()
    assert len(runs) == 40
    assert all(r["status"] == "ok" for r in runs)
    assert {r["stage"] for r in runs} == {"proc.a", "proc.b"}


def test_format_runs_table(db: Path):
    assert format_runs_table([]) == "no runs recorded"
    history = History(db)
    done = history.start("train.experts", {})
    history.finish(done, metrics={"eval_loss": 0.123456, "nested": {"x": 1}, "very_long_metric_name_here": 7})
    history.start("train.router", {})
    lines = format_runs_table(history.runs()).splitlines()
    assert lines[0].split()[:3] == ["run_id", "stage", "status"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4
    assert "eval_loss=0.1235" in lines[3]
    assert "nested" not in lines[3]
    assert "very_long_metri~=7" in lines[3]
    assert lines[2].split()[2] == "running" and lines[2].split()[-1] == "-"


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_records_host_and_pid_and_a_gone_process_reads_interrupted(db: Path, monkeypatch):
    import os
    import platform
    import sqlite3

    history = History(db)
    alive = history.start("train.router", {}, output="/out")
    gone = history.start("train.router", {}, output="/out")
    elsewhere = history.start("train.router", {}, output="/out")
    run = history.get(alive)
    assert (run["host"], run["pid"], run["output"]) == (platform.node(), os.getpid(), "/out")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (_dead_pid(), gone))
        conn.execute("UPDATE runs SET host = 'other-host', pid = 1 WHERE run_id = ?", (elsewhere,))
    monkeypatch.setenv(LOCK_SHARED_ENV, "1")  # containers may share host names: pids are not judged
    assert history.reconcile() == []
    monkeypatch.delenv(LOCK_SHARED_ENV)
    assert history.reconcile() == [gone]
    assert history.get(gone)["status"] == "interrupted" and "ended without" in history.get(gone)["error"]
    assert history.get(alive)["status"] == "running"
    assert history.get(elsewhere)["status"] == "running"  # another host's pid cannot be checked here
    assert history.interrupt_holder("other-host", 1, "/out") == [elsewhere]


def test_resume_links_the_last_interrupted_run_and_user_errors_keep_their_message(db: Path, tmp_path: Path):
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt), record_run(db, "train.router", {}, output=out):
        raise KeyboardInterrupt
    with pytest.raises(UserError), record_run(db, "train.router", {}, output=tmp_path / "other"):
        raise UserError("other.yaml: lr: expected a number")
    history = History(db)
    interrupted = history.runs(status="interrupted")[0]
    assert interrupted["output"] == str(out.resolve())
    with record_run(db, "train.router", {}, output=out, resume=True) as resumed:
        pass
    assert history.get(resumed.run_id)["resumed_from"] == interrupted["run_id"]
    failed = history.runs(status="failed")[0]
    assert failed["error"] == "other.yaml: lr: expected a number"  # as printed, no class name
    with record_run(db, "train.router", {}, output=out) as fresh:  # not --resume: links nothing
        pass
    assert history.get(fresh.run_id)["resumed_from"] is None


def test_a_run_whose_lease_was_taken_over_on_another_host_reads_interrupted(db: Path, tmp_path: Path):
    import sqlite3

    out = tmp_path / "ckpt"
    history = History(db)
    other = history.start("train.router", {}, output=str(out.resolve()))
    with sqlite3.connect(db) as conn:  # as written by another container: its pid means nothing here
        conn.execute("UPDATE runs SET host = 'container-a', pid = 7 WHERE run_id = ?", (other,))
    holder = {"host": "container-a", "pid": 7}
    with record_run(db, "train.router", {}, output=out, resume=True, taken_over=[holder]) as rec:
        pass
    assert history.get(other)["status"] == "interrupted"
    assert "stopped renewing" in history.get(other)["error"]
    assert history.get(rec.run_id)["resumed_from"] == other


def test_database_without_the_new_columns_is_migrated(db: Path):
    import sqlite3

    db.parent.mkdir(parents=True)
    old_schema = (
        "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);"
        "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL UNIQUE,"
        " stage TEXT NOT NULL, status TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT,"
        " duration_s REAL, config_json TEXT NOT NULL, data_hash TEXT, metrics_json TEXT,"
        " artifacts_json TEXT, error TEXT, cost_usd REAL, host TEXT);"
        "INSERT INTO runs (run_id, stage, status, started_at, config_json, host)"
        " VALUES ('old1', 'train.router', 'running', '2026-01-01T00:00:00+00:00', '{}', 'h');"
    )
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(old_schema)
    history = History(db)
    assert history.reconcile() == []  # an old row has no pid: never judged
    new = history.start("train.router", {}, output="/o")
    assert [r["run_id"] for r in history.runs()] == [new, "old1"]
    assert history.get("old1")["pid"] is None and history.get(new)["pid"]


def test_record_run_redacts_credentials_in_any_error(db: Path):
    message = 'Invalid bucket name "AKIAXX:sekret@bucket": Bucket name must match the regex'
    with pytest.raises(ValueError), record_run(db, "deploy", {}):
        raise ValueError(message)  # what botocore says about s3://AKIAXX:sekret@bucket
    with pytest.raises(UserError), record_run(db, "deploy", {}):
        raise UserError("s3://KEY:sekret@bucket: deploy failed")
    errors = [r["error"] for r in History(db).runs()]
    assert errors == [
        "s3://***@bucket: deploy failed",
        'ValueError: Invalid bucket name "***@bucket": Bucket name must match the regex',
    ]


def test_jsonl_history_marks_dead_runs_of_this_machine_only(tmp_path: Path):
    import json

    from mole_trainer.history_files import FileHistory, machine_id

    history = FileHistory(tmp_path / "runs")
    alive = history.start("train.router", {}, output="/out")
    assert history.get(alive)["machine"] == machine_id() is not None
    dead = _dead_pid()
    variants = {  # this machine; another container with the same host name; a run from before machine ids
        "gone": {"pid": dead, "pid_start": None},
        "elsewhere": {"pid": dead, "machine": "another-boot/pid:[4026531836]"},
        "old": {"pid": dead, "machine": None},
    }
    for run_id, change in variants.items():
        assert history.insert_run({**history.get(alive), **change, "run_id": run_id})
    lines = [json.loads(line) for line in next((tmp_path / "runs").glob("*.jsonl")).read_text().splitlines()]
    assert [e["run"]["pid"] == dead for e in lines] == [False, True, True, True]
    assert FileHistory(tmp_path / "runs").reconcile() == ["gone"]
    reader = FileHistory(tmp_path / "runs")
    assert reader.get("gone")["status"] == "interrupted" and "ended without" in reader.get("gone")["error"]
    assert [reader.get(r)["status"] for r in (alive, "elsewhere", "old")] == ["running"] * 3
    assert reader.reconcile() == []  # marked once
