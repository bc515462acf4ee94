"""Reading a work directory's whole history (SQLite file and JSONL folder merged), one run, two runs side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .layout import HISTORY_DB, HISTORY_DIR


@dataclass
class HistoryData:
    """Every run (newest first) and every metric row of a work directory."""

    runs: list[dict]
    metrics: list[dict]

    def run(self, run_id: str) -> dict:
        """The run `run_id` (a unique prefix of it is enough); UserError naming the choices otherwise."""
        exact = [r for r in self.runs if r["run_id"] == run_id]
        found = exact or [r for r in self.runs if r["run_id"].startswith(run_id)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise UserError(f"no run with id {run_id!r} in this work directory (see `mole history show`)")
        raise UserError(f"run id {run_id!r} is ambiguous: {', '.join(r['run_id'] for r in found)}")

    def series(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """The metric rows of one run as {name: [(step, value), ...]} sorted by step."""
        out: dict[str, list[tuple[int, float]]] = {}
        for row in self.metrics:
            if row["run_id"] == run_id:
                out.setdefault(row["name"], []).append((row["step"], row["value"]))
        return {name: sorted(points) for name, points in sorted(out.items())}


def read_history(workdir: str | Path, reconcile: bool = True) -> HistoryData:
    """Merge the work directory's SQLite history and its JSONL files (written on shared Volumes).

    Nothing is created when neither exists. With `reconcile`, runs of this host (SQLite) or machine
    (JSONL, history_files.machine_id) whose process is gone are first marked interrupted.
    """
    from .history import History
    from .history_files import FileHistory

    runs: dict[str, dict] = {}
    metrics: dict[tuple, dict] = {}
    db = Path(workdir) / HISTORY_DB
    stores: list[Any] = []
    if db.exists():
        history = History(db)
        if reconcile:
            history.reconcile()
        stores.append(history)
    if (Path(workdir) / HISTORY_DIR).is_dir():
        files = FileHistory(Path(workdir) / HISTORY_DIR)
        if reconcile:
            files.reconcile()
        stores.append(files)
    for store in stores:
        for run in store.runs():
            runs.setdefault(run["run_id"], run)
        for row in store.metric_rows():
            metrics.setdefault((row["run_id"], row["step"], row["name"]), row)
    ordered = sorted(runs.values(), key=lambda r: r["started_at"], reverse=True)
    return HistoryData(ordered, list(metrics.values()))


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {'a.b': value}; lists stay values."""
    if not isinstance(obj, dict):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flat(value, name))
        else:
            out[name] = value
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summary_fields(run: dict) -> dict[str, Any]:
    """The fields shown for every run: who, where, when, how long, how much."""
    return {
        "stage": run["stage"],
        "status": run["status"],
        "started_at": run["started_at"],
        "finished_at": run.get("finished_at"),
        "wall_s": run.get("duration_s"),
        "device": run.get("device"),
        "cost_usd": run.get("cost_usd"),
        "git_commit": run.get("git_commit"),
        "git_dirty": run.get("git_dirty"),
        "data_hash": run.get("data_hash"),
        "host": run.get("host"),
        "output": run.get("output"),
        "resumed_from": run.get("resumed_from"),
        "source": run.get("source"),
        "error": run.get("error"),
    }


def format_run(run: dict, data: HistoryData) -> str:
    """Everything recorded about one run, as text: fields, config, metrics, artifacts, metric series."""
    lines = [f"run {run['run_id']}"]
    lines += [f"  {k:<13} {_cell(v)}" for k, v in summary_fields(run).items() if v is not None]
    for title, key in (("config", "config"), ("metrics", "metrics"), ("artifacts", "artifacts")):
        values = flat(run.get(key) or {})
        if values:
            lines.append(f"{title}:")
            lines += [f"  {k} = {_cell(v)}" for k, v in values.items()]
    series = data.series(run["run_id"])
    if series:
        lines.append("metric series (name: points, first -> last):")
        for name, points in series.items():
            (s0, v0), (s1, v1) = points[0], points[-1]
            lines.append(f"  {name}: {len(points)} points, step {s0} = {v0:.4g} -> step {s1} = {v1:.4g}")
    return "\n".join(lines)


def compare_rows(a: dict, b: dict) -> list[tuple[str, str, str, str]]:
    """(field, value in a, value in b, b - a) for the summary fields, then every config and metric key
    that differs; metrics with a numeric change get the change, equal config keys are left out."""
    rows = []
    for key, va in summary_fields(a).items():
        vb = summary_fields(b)[key]
        if va is not None or vb is not None:
            delta = f"{vb - va:+.6g}" if _scalar(va) and _scalar(vb) else ""
            rows.append((key, _cell(va), _cell(vb), delta))
    ca, cb = flat(a.get("config") or {}), flat(b.get("config") or {})
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            rows.append((f"config.{key}", _cell(ca.get(key)), _cell(cb.get(key)), ""))
    ma, mb = flat(a.get("metrics") or {}), flat(b.get("metrics") or {})
    for key in sorted(set(ma) | set(mb)):
        va, vb = ma.get(key), mb.get(key)
        if isinstance(va, list) or isinstance(vb, list):
            continue  # matrices and bins: compared in the report's figures, not as text
        delta = f"{vb - va:+.6g}" if _scalar(va) and _scalar(vb) else ""
        rows.append((f"metrics.{key}", _cell(va), _cell(vb), delta))
    return rows


def format_compare(a: dict, b: dict) -> str:
    """Two runs side by side (compare_rows) as a fixed-width table."""
    header = ("field", a["run_id"], b["run_id"], "change")
    rows = [header, *compare_rows(a, b)]
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(4)]

    def fit(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "~"

    lines = ["  ".join(fit(c, w).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if a["stage"] != b["stage"]:
        lines.append(f"note: different stages ({a['stage']} vs {b['stage']})")
    return "\n".join(lines)
