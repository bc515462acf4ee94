"""Run history: one SQLite row per run of a pipeline stage (layout.HISTORY_DB in the work dir).

Each row records the stage, its status (running, ok, failed, skipped, interrupted), start and finish
times (ISO 8601 UTC), the config, an optional data hash, metrics, artifacts, the error text of a failed
run, an optional cost, the host and pid of the process (with its start time, against pid reuse), the
output folder it wrote and, for a --resume run, the run it continues. Several processes may write at
once: the database runs in WAL mode and every connection waits up to ``TIMEOUT_S`` for a lock. WAL
needs a local filesystem; a database on a network share may report "database is locked".

A 'running' row whose process is gone (same host, pid not alive or reused) is marked 'interrupted' by
``History.reconcile`` (history show, and the start of every run; not under MOLE_LOCK_SHARED=1, where
host names may repeat across containers); a row of another host stays
'running' until a writer takes over that run's output lock once its lease expired. Databases written
before the pid/output columns existed are migrated in place (ALTER TABLE ADD COLUMN); their old rows
have no pid and are never marked.
"""

from __future__ import annotations

import json
import logging
import platform
import sqlite3
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .history_writer import RESUMABLE, RunWriter, json_text
from .layout import HISTORY_DIR

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TIMEOUT_S = 30.0
_SQLITE_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    duration_s REAL,
    config_json TEXT NOT NULL,
    data_hash TEXT,
    metrics_json TEXT,
    artifacts_json TEXT,
    error TEXT,
    cost_usd REAL,
    host TEXT
);
CREATE INDEX IF NOT EXISTS runs_stage ON runs (stage, id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    UNIQUE (run_id, step, name)
);
"""
# added after schema version 1; additive, so older readers still work and the version stays 1
_ADDED_COLUMNS = {
    "pid": "INTEGER",
    "pid_start": "INTEGER",
    "output": "TEXT",
    "resumed_from": "TEXT",
    "git_commit": "TEXT",
    "git_dirty": "INTEGER",
    "device": "TEXT",
    "source": "TEXT",  # where `history backfill` imported the run from (None: recorded as it ran)
}
# every column a run row has, in the order `insert_run` writes them
RUN_COLUMNS = (
    "run_id",
    "stage",
    "status",
    "started_at",
    "finished_at",
    "duration_s",
    "config_json",
    "data_hash",
    "metrics_json",
    "artifacts_json",
    "error",
    "cost_usd",
    "host",
    *_ADDED_COLUMNS,
)
_JSON_FIELDS = {"config_json": "config", "metrics_json": "metrics", "artifacts_json": "artifacts"}


class History(RunWriter):
    """The run history stored in one SQLite file; the file and its schema are created on first use."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        self._check_file()
        self._init_schema()

    def _check_file(self) -> None:
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; expected a run-history SQLite file")
        if self.path.is_file():
            with self.path.open("rb") as fh:
                head = fh.read(len(_SQLITE_HEADER))
            if head and head != _SQLITE_HEADER:
                raise UserError(
                    f"{self.path}: not a SQLite database; expected the run-history file "
                    "(move it away to start a new history)"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode: each statement is its own transaction unless BEGIN is issued explicitly
        conn = sqlite3.connect(self.path, timeout=TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        # in WAL mode NORMAL cannot corrupt the file; a power cut may lose the last commits, not a crash
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _init_schema(self) -> None:
        try:
            with closing(self._connect()) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                have = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in have:
                        conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                if row[0] is None:
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: cannot open the run-history database ({exc})") from exc
        version = row[0] or SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: history schema version {version} is newer than this mole-trainer "
                f"supports ({SCHEMA_VERSION}); upgrade mole-trainer"
            )

    def _store_started(self, run: dict) -> None:
        self.insert_run(run)

    def _interrupt(self, conn: sqlite3.Connection, row: sqlite3.Row, why: str) -> None:
        # status = 'running' in the WHERE: a run that finished meanwhile keeps its own result
        conn.execute(
            "UPDATE runs SET status = 'interrupted', error = ? WHERE run_id = ? AND status = 'running'",
            (f"process {row['pid']} on {row['host']} {why}", row["run_id"]),
        )

    def reconcile(self) -> list[str]:
        """Mark 'interrupted' the running runs of this host whose process is gone; returns their ids.

        Nothing is judged by pid under MOLE_LOCK_SHARED=1 (containers may share a host name): there a
        run is marked when a writer takes over its expired output lease.
        """
        from .locking import process_alive, shared_volume

        if shared_volume():
            return []
        gone = []
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT run_id, host, pid, pid_start FROM runs WHERE status = 'running' AND host = ? "
                "AND pid IS NOT NULL",
                (platform.node(),),
            ).fetchall()
            for row in rows:
                if not process_alive(row["pid"], row["pid_start"]):
                    self._interrupt(conn, row, "ended without recording a result")
                    gone.append(row["run_id"])
        return gone

    def interrupt_holder(self, host: str, pid: int, output: str) -> list[str]:
        """Mark 'interrupted' the running runs of a lock holder whose lock was taken over as stale."""
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT run_id, host, pid FROM runs WHERE status = 'running' AND host = ? AND pid = ? "
                "AND output = ?",
                (host, pid, output),
            ).fetchall()
            for row in rows:
                self._interrupt(conn, row, "stopped renewing its output lock")
        return [row["run_id"] for row in rows]

    def last_attempt(self, stage: str, output: str) -> str | None:
        """run_id of the newest interrupted or failed run of `stage` on `output` (what a resume continues)."""
        marks = ",".join("?" * len(RESUMABLE))
        with closing(self._connect()) as conn:
            row = conn.execute(
                f"SELECT run_id FROM runs WHERE stage = ? AND output = ? AND status IN ({marks}) "
                "ORDER BY id DESC LIMIT 1",
                (stage, output, *RESUMABLE),
            ).fetchone()
        return row["run_id"] if row else None

    def _started_run(self, run_id: str) -> dict:
        return self.get(run_id)

    def _store_finished(self, run: dict, closed: dict) -> None:
        row = encode_run(closed)
        del row["config_json"]  # the run's config is stored already
        with closing(self._connect()) as conn:
            conn.execute(
                f"UPDATE runs SET {', '.join(f'{c} = ?' for c in row)} WHERE run_id = ?",
                [*row.values(), run["run_id"]],
            )

    def add_metrics(self, run_id: str, rows: Iterable[tuple[int, str, float]]) -> int:
        """Store (step, name, value) rows of a run in one transaction; returns how many were new.

        A row whose (run, step, name) is already stored is kept as it was (a second import adds nothing).
        """
        rows = [(run_id, int(step), str(name), float(value)) for step, name, value in rows]
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)", rows
            )
            added = conn.total_changes - before
            conn.execute("COMMIT")
        return added

    def metric_rows(self, run_id: str | None = None) -> list[dict]:
        """Metric rows ({run_id, step, name, value}), of one run or all, by run, name and step."""
        sql, params = "SELECT run_id, step, name, value FROM metrics", []
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params.append(run_id)
        with closing(self._connect()) as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY run_id, name, step", params)]

    def insert_run(self, run: dict) -> bool:
        """Store a finished run as given (a backfilled one); False when its run_id is already stored."""
        row = encode_run(run)
        marks = ", ".join("?" * len(RUN_COLUMNS))
        with closing(self._connect()) as conn:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({marks})",
                [row.get(c) for c in RUN_COLUMNS],
            )
            return cur.rowcount == 1

    def runs(
        self, stage: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[dict]:
        """Runs newest first, with config / metrics / artifacts decoded.

        ``stage`` matches the exact name or a dotted prefix ('train' matches 'train.experts').
        """
        sql, params = "SELECT * FROM runs", []
        where = []
        if stage is not None:
            where.append("(stage = ? OR substr(stage, 1, ?) = ?)")
            params += [stage, len(stage) + 1, stage + "."]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with closing(self._connect()) as conn:
            return [_decode(row) for row in conn.execute(sql, params)]

    def get(self, run_id: str) -> dict:
        """One run by run_id; UserError if there is none."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"{self.path}: no run with id {run_id!r}")
        return _decode(row)


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for column, key in _JSON_FIELDS.items():
        text = out.pop(column)
        out[key] = json.loads(text) if text is not None else None
    if out.get("git_dirty") is not None:
        out["git_dirty"] = bool(out["git_dirty"])
    return out


def encode_run(run: dict) -> dict:
    """A run as `runs()` returns it, with its JSON fields encoded as stored (the inverse of decoding)."""
    row = {k: v for k, v in run.items() if k not in _JSON_FIELDS.values()}
    for column, key in _JSON_FIELDS.items():
        row[column] = json_text(run[key]) if run.get(key) is not None else ("{}" if key == "config" else None)
    return row


def open_history(db_path: str | Path):
    """The history a run writes into: the SQLite file, or under MOLE_LOCK_SHARED=1 (a Volume shared by
    containers, where SQLite's locks do not hold) JSONL files beside it, one per writer (history_files)."""
    from .locking import shared_volume

    if shared_volume():
        from .history_files import FileHistory

        return FileHistory(Path(db_path).with_name(HISTORY_DIR))
    return History(db_path)


@dataclass
class RunRecord:
    """What a stage fills in while it runs under record_run; status may be set to 'skipped'."""

    run_id: str
    metrics: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    cost_usd: float | None = None
    status: str = "ok"
    history: Any = None  # where add_metric_rows writes (None: a run that is not recorded)

    def add_metric_rows(self, rows: Iterable[tuple[int, str, float]]) -> int:
        """Store (step, name, value) rows of this run at once (curves survive a later failure)."""
        rows = list(rows)
        return self.history.add_metrics(self.run_id, rows) if self.history is not None and rows else 0


@contextmanager
def record_run(
    db_path: str | Path,
    stage: str,
    config: dict,
    data_hash: str | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    taken_over: Sequence[dict] = (),
) -> Iterator[RunRecord]:
    """Record the enclosed block as one run of ``stage`` writing ``output``.

    Runs of this host whose process is gone are first marked 'interrupted', and so are the runs of
    `taken_over` (holders of ``output``'s lock this run took over). A `resume` run records the newest
    interrupted or failed run of the same stage and output as the one it continues.

    The run finishes with the record's status ('ok' unless the caller changed it) and its metrics,
    artifacts and cost. An exception marks the run 'failed' with the error text (a UserError's
    message as printed), KeyboardInterrupt marks it 'interrupted'; the exception is re-raised, and a
    failure to write that row is logged, never raised over it.
    """
    from .runinfo import detect_device, device_label, hourly_rate, load_prices

    prices = load_prices(Path(db_path).parent)  # a broken price file fails before the run starts
    history = open_history(db_path)
    history.reconcile()
    output = str(Path(output).resolve()) if output is not None else None
    for holder in taken_over:
        history.interrupt_holder(holder.get("host"), holder.get("pid"), output)
    resumed_from = history.last_attempt(stage, output) if resume and output else None
    record = RunRecord(history.start(stage, config, data_hash, output, resumed_from), history=history)

    def finish(status: str, error: str | None) -> None:
        device, count = detect_device()
        rate = hourly_rate(device, count, prices)
        label = device_label(device, count, prices)
        history.finish(
            record.run_id, status, record.metrics, record.artifacts, error, record.cost_usd, label, rate
        )

    try:
        yield record
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        from .storage import redact

        if isinstance(exc, UserError):
            error = redact(str(exc))
        else:  # a backend's message may echo a URL with credentials in it
            error = redact("".join(traceback.format_exception_only(exc)).strip())
        try:
            finish(status, error)
        except (sqlite3.Error, OSError, UserError) as db_exc:
            log.warning("could not record the failure of run %s in %s: %s", record.run_id, db_path, db_exc)
        raise
    finish(record.status, None)


def _short(value: Any, width: int = 10) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "~"


def _metric_summary(metrics: dict | None, count: int = 3) -> str:
    scalars = [
        (k, v) for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return " ".join(f"{_short(k, 16)}={_short(v)}" for k, v in scalars[:count])


def format_runs_table(runs: list[dict]) -> str:
    """A fixed-width text table of runs: run_id, stage, status, start time, seconds, a few metrics."""
    if not runs:
        return "no runs recorded"
    header = ("run_id", "stage", "status", "started (UTC)", "seconds", "metrics")
    rows = [
        (
            run["run_id"],
            run["stage"],
            run["status"],
            run["started_at"][:19].replace("T", " "),
            f"{run['duration_s']:.1f}" if run.get("duration_s") is not None else "-",
            _metric_summary(run.get("metrics")),
        )
        for run in runs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
