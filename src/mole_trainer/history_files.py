"""Run history as JSONL files, one per writer, for folders shared by machines (a Modal Volume).

SQLite's locks do not hold on a network file system, and of two containers committing the same
file a Volume keeps only the last. Here every History object writes its own file
(HISTORY_DIR/<time>-<host>-<pid>-<random>.jsonl), appending one JSON object per line:

    {"kind": "run", "run": {...}}                       the run as `runs()` returns it (start, then finish)
    {"kind": "metric", "run_id", "step", "name", "value"}
    {"kind": "interrupt", "run_id", "error"}            a run whose output lease another writer took
                                                        over, or whose process is gone (reconcile)

Readers merge every file: a run's later line replaces its earlier one, an interrupt applies to a
run still 'running', and a metric row's first (run, step, name) wins. No file is ever written by
two processes, so concurrent writers lose nothing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from .errors import UserError
from .history_writer import RESUMABLE, RunWriter, json_text

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


def machine_id() -> str | None:
    """Where this process's pids mean something: the kernel's boot id and the pid namespace.

    Host names may repeat across containers sharing a Volume, so a run is judged by pid only where
    this id matches the one it recorded. None where /proc does not tell (then nothing is judged).
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "host"


class FileHistory(RunWriter):
    """The run history of one folder of JSONL files; this object appends to a file of its own."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: is a file; expected the run-history folder of JSONL files")
        self._file: Path | None = None
        self._pid: int | None = None
        self._started: dict[str, dict] = {}
        self._rows: dict[str, set] = {}

    # -- writing --------------------------------------------------------------------------------
    def _own_file(self) -> Path:
        if self._file is None or self._pid != os.getpid():  # a forked child gets a file of its own
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            name = f"{stamp}-{_safe(platform.node())}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
            self._file, self._pid = self.folder / name, os.getpid()
        return self._file

    def _append(self, entries: list[dict]) -> None:
        if not entries:
            return
        data = "".join(json_text(e) + "\n" for e in entries).encode()
        fd = os.open(self._own_file(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _store_started(self, run: dict) -> None:
        run["machine"] = machine_id()  # reconcile marks only this machine's dead runs interrupted
        self._append([{"kind": "run", "run": run}])
        self._started[run["run_id"]] = run

    def _started_run(self, run_id: str) -> dict:
        return self._started.get(run_id) or self.get(run_id)

    def _store_finished(self, run: dict, closed: dict) -> None:
        self._append([{"kind": "run", "run": {**run, **closed}}])

    def add_metrics(self, run_id: str, rows: Iterable[tuple[int, str, float]]) -> int:
        """Append (step, name, value) rows of a run; returns how many were new to the history."""
        if run_id not in self._rows:  # what the history holds of this run: read once, then kept here
            self._rows[run_id] = {(r["step"], r["name"]) for r in self.metric_rows(run_id)}
        have = self._rows[run_id]
        new = []
        for step, name, value in rows:
            key = (int(step), str(name))
            if key not in have:
                have.add(key)
                new.append(
                    {"kind": "metric", "run_id": run_id, "step": key[0], "name": key[1], "value": value}
                )
        self._append(new)
        return len(new)

    def insert_run(self, run: dict) -> bool:
        """Store a finished run as given (a backfilled one); False when its run_id is already stored."""
        if run["run_id"] in self._merged()[0]:
            return False
        self._append([{"kind": "run", "run": json.loads(json_text(run))}])
        return True

    def reconcile(self) -> list[str]:
        """Mark 'interrupted' the running runs started on this machine (machine_id: same kernel boot
        and pid namespace) whose process is gone; returns their ids.

        Runs of other machines, and runs recorded without a machine id, are left 'running' until a
        writer takes over their output lease (interrupt_holder): their pids cannot be checked here.
        """
        from .locking import process_alive

        here = machine_id()
        if here is None:
            return []
        gone = [
            r
            for r in self._merged()[0].values()
            if r["status"] == "running"
            and r.get("machine") == here
            and r.get("pid") is not None
            and not process_alive(r["pid"], r.get("pid_start"))
        ]
        self._append(
            [
                {
                    "kind": "interrupt",
                    "run_id": r["run_id"],
                    "error": f"process {r['pid']} on {r['host']} ended without recording a result",
                }
                for r in gone
            ]
        )
        return [r["run_id"] for r in gone]

    def interrupt_holder(self, host: str, pid: int, output: str) -> list[str]:
        """Mark 'interrupted' the running runs of a lock holder whose lock was taken over as stale."""
        gone = [
            r["run_id"]
            for r in self._merged()[0].values()
            if r["status"] == "running" and (r["host"], r["pid"], r["output"]) == (host, pid, output)
        ]
        error = f"process {pid} on {host} stopped renewing its output lock"
        self._append([{"kind": "interrupt", "run_id": run_id, "error": error} for run_id in gone])
        return gone

    # -- reading --------------------------------------------------------------------------------
    def _merged(self) -> tuple[dict[str, dict], dict[tuple, dict]]:
        runs: dict[str, dict] = {}
        interrupts: dict[str, str] = {}
        metrics: dict[tuple, dict] = {}
        files = sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []
        for path in files:
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    kind = entry["kind"]
                    if kind == "run":
                        runs[entry["run"]["run_id"]] = entry["run"]
                    elif kind == "metric":
                        key = (entry["run_id"], int(entry["step"]), entry["name"])
                        metrics.setdefault(key, {k: entry[k] for k in ("run_id", "step", "name", "value")})
                    elif kind == "interrupt":
                        interrupts.setdefault(entry["run_id"], entry["error"])
                except (ValueError, KeyError, TypeError):  # a torn last line of a killed writer
                    log.warning("%s:%d: not a run-history entry; skipped", path, number)
        for run_id, error in interrupts.items():
            run = runs.get(run_id)
            if run is not None and run["status"] == "running":
                runs[run_id] = {**run, "status": "interrupted", "error": error}
        return runs, metrics

    def runs(
        self, stage: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[dict]:
        """Runs newest first (see History.runs)."""
        found = [
            r
            for r in self._merged()[0].values()
            if (stage is None or r["stage"] == stage or r["stage"].startswith(stage + "."))
            and (status is None or r["status"] == status)
        ]
        found.sort(key=lambda r: r["started_at"], reverse=True)
        return found[:limit] if limit is not None else found

    def get(self, run_id: str) -> dict:
        """One run by run_id; UserError if there is none."""
        run = self._merged()[0].get(run_id)
        if run is None:
            raise UserError(f"{self.folder}: no run with id {run_id!r}")
        return run

    def last_attempt(self, stage: str, output: str) -> str | None:
        """run_id of the newest interrupted or failed run of `stage` on `output`."""
        for run in self.runs(stage):
            if run["stage"] == stage and run["output"] == output and run["status"] in RESUMABLE:
                return run["run_id"]
        return None

    def metric_rows(self, run_id: str | None = None) -> list[dict]:
        """Metric rows ({run_id, step, name, value}), of one run or all, by run, name and step."""
        rows = [r for r in self._merged()[1].values() if run_id is None or r["run_id"] == run_id]
        return sorted(rows, key=lambda r: (r["run_id"], r["name"], r["step"]))
