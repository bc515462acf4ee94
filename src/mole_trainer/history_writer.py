"""What every run history store shares: the run statuses, and RunWriter, whose start() and finish() build
a run's row (id, times, config as JSON, host and pid, git state, cost) for a store to keep. The stores:
history.History (SQLite) and history_files.FileHistory (JSONL files on a shared Volume).
"""

from __future__ import annotations

import json
import os
import platform
import uuid
from datetime import UTC, datetime
from typing import Any

STATUSES = ("running", "ok", "failed", "skipped", "interrupted")
RESUMABLE = ("interrupted", "failed")  # what a --resume run continues


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def json_text(obj: Any) -> str:
    """JSON of `obj` with sorted keys, as a run's fields are stored; a value JSON cannot hold (a Path in a
    config) is written as its str, so it never fails the whole run."""
    return json.dumps(obj, sort_keys=True, default=str)


class RunWriter:
    """start() and finish() of a run history; History (SQLite) and FileHistory (JSONL files) store the rows."""

    def start(
        self,
        stage: str,
        config: dict,
        data_hash: str | None = None,
        output: str | None = None,
        resumed_from: str | None = None,
    ) -> str:
        """Record a run of this process with status 'running' and return its run_id."""
        from .locking import process_start
        from .runinfo import git_state

        pid = os.getpid()
        commit, dirty = git_state()
        run = {
            "run_id": new_run_id(),
            "stage": stage,
            "status": "running",
            "started_at": _now(),
            "finished_at": None,
            "duration_s": None,
            "config": json.loads(json_text(config)),
            "data_hash": data_hash,
            "metrics": None,
            "artifacts": None,
            "error": None,
            "cost_usd": None,
            "host": platform.node(),
            "pid": pid,
            "pid_start": process_start(pid),
            "output": output,
            "resumed_from": resumed_from,
            "git_commit": commit,
            "git_dirty": dirty,
            "device": None,
            "source": None,
        }
        self._store_started(run)
        return run["run_id"]

    def finish(
        self,
        run_id: str,
        status: str = "ok",
        metrics: dict | None = None,
        artifacts: dict | None = None,
        error: str | None = None,
        cost_usd: float | None = None,
        device: str | None = None,
        usd_per_hour: float | None = None,
    ) -> None:
        """Close a run: set its final status, finish time, duration and results.

        Without `cost_usd`, a known `usd_per_hour` (runinfo.hourly_rate) prices the run's wall time.
        """
        check_final(status)
        run = self._started_run(run_id)
        finished = datetime.now(UTC)
        duration = (finished - datetime.fromisoformat(run["started_at"])).total_seconds()
        closed = {
            "status": status,
            "finished_at": finished.isoformat(timespec="microseconds"),
            "duration_s": duration,
            "metrics": json.loads(json_text(metrics or {})),
            "artifacts": json.loads(json_text(artifacts or {})),
            "error": error,
            "cost_usd": estimate_cost(cost_usd, duration, usd_per_hour),
            "device": device,
        }
        self._store_finished(run, closed)

    def _store_started(self, run: dict) -> None:
        raise NotImplementedError

    def _started_run(self, run_id: str) -> dict:
        raise NotImplementedError

    def _store_finished(self, run: dict, closed: dict) -> None:
        raise NotImplementedError


def new_run_id() -> str:
    """A fresh random run id."""
    return uuid.uuid4().hex[:12]


def check_final(status: str) -> None:
    """ValueError unless `status` is a final status (not 'running')."""
    if status not in STATUSES or status == "running":
        raise ValueError(f"final status must be one of {', '.join(STATUSES[1:])}; got {status!r}")


def estimate_cost(cost_usd: float | None, duration_s: float, usd_per_hour: float | None) -> float | None:
    """The given cost, else the wall time priced at `usd_per_hour`, else None (no price known)."""
    if cost_usd is not None or usd_per_hour is None:
        return cost_usd
    return duration_s / 3600.0 * usd_per_hour
