"""Import past runs from their folders into the run history (`mole history backfill DIR`), idempotently.

What is read below DIR:
- our training outputs: train_log.jsonl with router_info.json (train.router) or expert_info.json
  (train.experts) beside it; every numeric key of a log line becomes a metric row at its step;
- our evaluation reports (``*report*.json`` with accuracy, top_k, confusion and calibration): eval.router;
- TensorBoard event files (every scalar), unless the folder or one above it holds a train_log.jsonl
  or trainer_state.json that says the same;
- Hugging Face Trainer trainer_state.json (its log_history), the newest checkpoint's per output folder.

A backfilled run's id is derived from the content it came from, so importing the same files again
adds nothing. A folder that a recorded run already names (its adapter or report among that run's
artifacts) is not imported a second time; its curve is attached to that run instead when missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import UserError
from .hashing import sha256_file
from .layout import EXPERT_INFO_FILE, ROUTER_INFO_FILE, TRAIN_LOG_FILE

TRAINER_STATE_FILE = "trainer_state.json"  # what transformers' Trainer writes into each checkpoint
EVENTS_PREFIX = "events.out.tfevents."
_HF_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
REPORT_KEYS = ("accuracy", "top_k", "confusion", "calibration")  # what marks a `mole eval router` report
MAX_REPORT_BYTES = 50 * 1024 * 1024


@dataclass
class Found:
    """One run found on disk: the run record, its metric rows, and what names it for de-duplication."""

    run: dict
    rows: list[tuple[int, str, float]]
    claims: list[str] = field(default_factory=list)  # adapter / report paths a recorded run may name


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def log_rows(path: Path, prefix: str = "", problems: list[str] | None = None) -> list[tuple[int, str, float]]:
    """(step, prefix + key, value) for every numeric key of every line of a train_log.jsonl.

    Lines without an integer 'step' or not JSON are left out (listed in `problems` when given);
    keys other than numbers (future fields of the log) are ignored.
    """
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            step = entry["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if problems is not None:
                problems.append(
                    f"{path}:{number}: expected a JSON object with an integer 'step'; line skipped"
                )
            continue
        rows += [(step, prefix + k, float(v)) for k, v in entry.items() if k != "step" and _number(v)]
    return rows


def eval_metrics(report: dict) -> dict:
    """The metrics an eval.router run records from its report (scalars, then what the figures need)."""
    metrics = {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "ece": report["calibration"]["ece"],
    }
    metrics.update({f"top{k}": v for k, v in report["top_k"].items() if k != "1"})
    consistency = report.get("consistency")
    if consistency:
        metrics["batch_invariance"] = consistency["batch_invariance"]
        metrics["perturbation_consistency"] = consistency["perturbation_mean"]
        metrics["perturbations"] = dict(consistency.get("perturbations") or {})
    metrics["confusion"] = report["confusion"]
    metrics["calibration_bins"] = report["calibration"].get("bins", [])
    return metrics


def _digest(*parts: bytes, files: list[Path] = ()) -> str:
    """Run id of an imported run: over the sha256 of each part, then of each file (streamed)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    for path in files:
        h.update(bytes.fromhex(sha256_file(path)))
    return "bf-" + h.hexdigest()[:12]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _run(run_id: str, stage: str, source: Path, end: float, seconds: float | None, **fields: Any) -> dict:
    finished = datetime.fromtimestamp(end, UTC)
    started = finished - timedelta(seconds=seconds) if seconds else finished
    return {
        "run_id": run_id,
        "stage": stage,
        "status": fields.pop("status", "ok"),
        "started_at": started.isoformat(timespec="microseconds"),
        "finished_at": finished.isoformat(timespec="microseconds"),
        "duration_s": seconds,
        "config": fields.pop("config", {}),
        "metrics": fields.pop("metrics", {}),
        "artifacts": fields.pop("artifacts", {}),
        "source": str(source),
        **fields,
    }


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not readable JSON ({exc}); skipped")
        return None


def _training(folder: Path, problems: list[str]) -> Found | None:
    log = folder / TRAIN_LOG_FILE
    router, expert = folder / ROUTER_INFO_FILE, folder / EXPERT_INFO_FILE
    info_path = router if router.is_file() else expert if expert.is_file() else None
    info = _read_json(info_path, problems) if info_path else None
    if info_path and not isinstance(info, dict):
        info = None
    prefix, metrics, artifacts, claims = "", {}, {}, []
    stage = "train"
    if info and info_path == router:
        stage = "train.router"
        metrics = {**(info.get("best") or {}), "steps": info.get("steps"), "best_step": info.get("best_step")}
        artifacts = {"adapter": info.get("adapter")}
    elif info:
        stage, name = "train.experts", info.get("expert") or folder.name
        prefix = f"{name}/"
        if info.get("metric"):
            metrics[f"{name}.{info['metric']}"] = info.get("value")
            metrics[f"{name}.base_{info['metric']}"] = info.get("base_value")
        metrics[f"{name}.best_val_loss"] = info.get("best_val_loss")
        artifacts = {name: info.get("adapter")}
    if info and info.get("adapter"):
        claims.append(str(info["adapter"]))
    rows = log_rows(log, prefix, problems) if log.is_file() else []
    if not rows and not info:
        return None
    config = {
        k: info[k] for k in ("lora", "train", "dataset", "data", "class_balanced") if info and k in info
    }
    content = [p.read_bytes() for p in (log, info_path) if p is not None and p.is_file()]
    end = max(p.stat().st_mtime for p in (log, info_path) if p is not None and p.is_file())
    status = "ok" if info else "interrupted"
    run = _run(
        _digest(stage.encode(), *content),
        stage,
        folder,
        end,
        info.get("train_seconds") if info else None,
        status=status,
        config=config,
        metrics={k: v for k, v in metrics.items() if v is not None},
        artifacts={k: v for k, v in artifacts.items() if v},
        error=None
        if info
        else f"imported from {log.name} without {ROUTER_INFO_FILE} or {EXPERT_INFO_FILE}: "
        "the run may not have finished",
    )
    return Found(run, rows, claims)


def _eval_report(path: Path, problems: list[str]) -> Found | None:
    if path.stat().st_size > MAX_REPORT_BYTES:
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # many *report*.json files are not ours; only ours are imported
    if not isinstance(report, dict) or not all(k in report for k in REPORT_KEYS):
        return None
    try:
        metrics = eval_metrics(report)
    except (KeyError, TypeError) as exc:
        problems.append(f"{path}: an eval report without {exc}; skipped")
        return None
    config = {k: report.get(k) for k in ("checkpoint", "test_data", "split") if k in report}
    run = _run(
        _digest(b"eval.router", path.read_bytes()),
        "eval.router",
        path,
        path.stat().st_mtime,
        None,
        config=config,
        metrics=metrics,
        artifacts={"report": str(path)},
    )
    return Found(run, [], [str(path)])


def _scalar_events(path: Path) -> list[tuple[int, str, float, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                number = value.simple_value
            elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                number = tensor_util.make_ndarray(value.tensor).item()
            else:
                continue
            if _number(number):
                out.append((int(event.step), value.tag, float(number), event.wall_time))
    return out


def _tensorboard(folder: Path, files: list[Path], problems: list[str]) -> Found | None:
    events = []
    for path in sorted(files):
        try:
            events += _scalar_events(path)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: listed, not fatal
            problems.append(f"{path}: not a readable TensorBoard event file ({type(exc).__name__}); skipped")
    if not events:
        return None
    # a resumed writer repeats steps: the last event of a (step, tag) wins, as in TensorBoard
    latest = {(step, tag): (value, t) for step, tag, value, t in sorted(events, key=lambda e: e[3])}
    rows = [(step, tag, value) for (step, tag), (value, _) in sorted(latest.items())]
    times = [e[3] for e in events]
    last = {tag: value for (_, tag), (value, _) in sorted(latest.items())}
    run = _run(
        _digest(b"tensorboard", files=sorted(files)),  # streamed: event files grow to gigabytes
        "train",
        folder,
        max(times),
        max(times) - min(times),
        metrics={f"last.{k}": v for k, v in last.items()},
    )
    return Found(run, rows, [])


def _trainer_state(path: Path, out: Path, problems: list[str]) -> Found | None:
    state = _read_json(path, problems)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        if state is not None:
            problems.append(
                f"{path}: log_history: expected a list (a transformers trainer_state.json); skipped"
            )
        return None
    rows, runtime = [], None
    for entry in state["log_history"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        runtime = entry.get("train_runtime", runtime)
        rows += [
            (entry["step"], k, float(v))
            for k, v in entry.items()
            if k not in ("step", "epoch", "train_runtime", "total_flos") and _number(v)
        ]
    keys = ("global_step", "max_steps", "num_train_epochs", "train_batch_size", "logging_steps", "eval_steps")
    config = {k: state[k] for k in keys if k in state}
    metrics = {k: state[k] for k in ("best_metric", "epoch", "global_step") if _number(state.get(k))}
    run = _run(
        _digest(b"trainer_state", path.read_bytes()),
        "train",
        out,
        path.stat().st_mtime,
        runtime if _number(runtime) else None,
        config=config,
        metrics=metrics,
        artifacts={"best_model_checkpoint": state.get("best_model_checkpoint")}
        if state.get("best_model_checkpoint")
        else {},
    )
    return Found(run, rows, [])


def find_runs(root: str | Path) -> tuple[list[Found], list[str]]:
    """Every run found below `root`, and the problems met (file: what was wrong)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (expected a folder holding past runs' outputs)")
    found, problems = [], []
    trained: set[Path] = set()  # folders whose own logs make their TensorBoard files redundant
    ours: set[Path] = set()  # our training outputs
    events: dict[Path, list[Path]] = {}
    states: dict[Path, tuple[int, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        names = set(filenames)
        if names & {TRAIN_LOG_FILE, ROUTER_INFO_FILE, EXPERT_INFO_FILE}:
            trained.add(folder)
            ours.add(folder)
            hit = _training(folder, problems)
            if hit:
                found.append(hit)
        inside_ours = any(t in folder.parents for t in ours)  # our checkpoints/step-N/ hold one too
        if TRAINER_STATE_FILE in names and not inside_ours:
            match = _HF_CHECKPOINT.search(folder.name)
            out = folder.parent if match else folder
            trained.add(out)
            step = int(match.group(1)) if match else 1 << 62  # the final state beats every checkpoint
            if out not in states or step > states[out][0]:
                states[out] = (step, folder / TRAINER_STATE_FILE)
        for name in sorted(filenames):
            if name.startswith(EVENTS_PREFIX):
                events.setdefault(folder, []).append(folder / name)
            elif name.endswith(".json") and "report" in name:
                hit = _eval_report(folder / name, problems)
                if hit:
                    found.append(hit)
    for out, (_, path) in sorted(states.items()):
        hit = _trainer_state(path, out, problems)
        if hit:
            found.append(hit)
    for folder, files in sorted(events.items()):
        if any(folder == t or t in folder.parents for t in trained):
            continue
        hit = _tensorboard(folder, files, problems)
        if hit:
            found.append(hit)
    return found, problems


def backfill(history, existing: list[dict], root: str | Path) -> dict:
    """Import what find_runs finds below `root` into `history` (a History or FileHistory).

    `existing` are the runs already recorded (merged). Returns counts that add up: every run found
    is either added, already present, or attached to the recorded run that names it.
    """
    found, problems = find_runs(root)
    claimed: dict[str, dict] = {}
    recorded = [r for r in existing if not r.get("source")]  # not an earlier backfill's run
    for run in sorted(recorded, key=lambda r: r["started_at"]):  # the newest recorded run wins
        for value in (run.get("artifacts") or {}).values():
            if isinstance(value, str):
                claimed[str(Path(value).resolve())] = run
    added = present = attached = rows_added = 0
    for hit in found:
        owner = next((claimed[c] for c in (str(Path(c).resolve()) for c in hit.claims) if c in claimed), None)
        if owner is not None:
            rows_added += history.add_metrics(owner["run_id"], hit.rows) if hit.rows else 0
            attached += 1
            continue
        if history.insert_run(hit.run):
            added += 1
        else:
            present += 1
        rows_added += history.add_metrics(hit.run["run_id"], hit.rows) if hit.rows else 0
    return {
        "found": len(found),
        "added": added,
        "already_present": present,
        "attached_to_recorded": attached,
        "metric_rows_added": rows_added,
        "problems": problems,
    }
