"""Quick checks of a router before it ships: `mole test router` and the accuracy gate of `mole deploy`.

`mole test router` scores a small held-out sample (the first N test records of each expert, in a
seeded hash order of their ids, so the sample does not depend on file order) with the same scoring
path as `mole eval router` and compares the overall accuracy with a threshold.

The gate of `mole deploy --min-accuracy` reads the router's recorded evaluation: the report of
`mole eval router` for these very adapter weights (matched by the sha256 recorded in the report),
else the validation accuracy that training wrote to router_info.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..adapter_info import adapter_digest, find_adapter_dir
from ..data.records import Sample
from ..errors import UserError
from ..layout import EVAL_REPORT_FILE, ROUTER_INFO_FILE

DEFAULT_PER_EXPERT = 8


class BelowThreshold(UserError):
    """A router's accuracy is below the asked minimum (exit status 1: the check ran and failed)."""

    exit_code = 1


def select_per_expert(samples: list[Sample], names: list[str], per_expert: int) -> dict[str, list[Sample]]:
    """Up to `per_expert` samples of each expert, the first in sha256(id) order (file order plays no part)."""
    out: dict[str, list[Sample]] = {n: [] for n in names}
    for s in sorted(samples, key=lambda s: hashlib.sha256(s.id.encode()).hexdigest()):
        if len(out[s.expert]) < per_expert:
            out[s.expert].append(s)
    return out


def quick_test_router(
    checkpoint: str | Path,
    test_data: str | Path,
    per_expert: int = DEFAULT_PER_EXPERT,
    min_accuracy: float | None = None,
    split: str | None = "test",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
) -> dict:
    """Route the sample and return per-expert and overall accuracy, and whether it passed."""
    from ..infer.scoring import route_probs
    from ..router_prompt import label_names
    from .router_eval import load_router, load_routing_records

    if per_expert < 1:
        raise UserError(f"--per-expert must be >= 1, got {per_expert}")
    model, processor, label_map, _ = load_router(checkpoint, device, dtype, base_model)
    names = label_names(label_map)
    picked = select_per_expert(load_routing_records(test_data, split, label_map), names, per_expert)
    samples = [s for n in names for s in picked[n]]
    predicted = route_probs(model, processor, samples, names, batch_size).argmax(-1).tolist()
    per: dict[str, dict] = {n: {"n": len(picked[n]), "correct": 0} for n in names}
    for s, p in zip(samples, predicted, strict=True):
        per[s.expert]["correct"] += int(names[p] == s.expert)
    for m in per.values():
        m["accuracy"] = round(m["correct"] / m["n"], 4) if m["n"] else None
    correct = sum(m["correct"] for m in per.values())
    accuracy = round(correct / len(samples), 4)
    return {
        "checkpoint": str(checkpoint),
        "test_data": str(test_data),
        "split": split,
        "per_expert_asked": per_expert,
        "per_expert": per,
        "n": len(samples),
        "correct": correct,
        "accuracy": accuracy,
        "min_accuracy": min_accuracy,
        "passed": min_accuracy is None or accuracy >= min_accuracy,
    }


def format_router_test(result: dict) -> str:
    """The short table of `mole test router`: per expert n, correct, accuracy; overall; the verdict."""
    lines = [
        f"router test: {result['checkpoint']} on {result['test_data']} "
        f"(split {result['split'] or 'all'}, up to {result['per_expert_asked']} per expert)",
        f"{'expert':<20}{'n':>5}{'correct':>9}{'accuracy':>10}",
    ]
    for name, m in result["per_expert"].items():
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        lines.append(f"{name:<20}{m['n']:>5}{m['correct']:>9}{acc:>10}")
    lines.append(f"{'overall':<20}{result['n']:>5}{result['correct']:>9}{result['accuracy']:>10.3f}")
    missing = [n for n, m in result["per_expert"].items() if not m["n"]]
    if missing:
        lines.append(f"warning: no records to test for {', '.join(missing)}")
    threshold = result["min_accuracy"]
    if threshold is not None:
        verdict = "PASS" if result["passed"] else "FAIL"
        sign = ">=" if result["passed"] else "<"
        lines.append(f"{verdict}: accuracy {result['accuracy']:.3f} {sign} --min-accuracy {threshold:g}")
    return "\n".join(lines)


def recorded_evaluation(checkpoint: str | Path, eval_report: str | Path | None = None) -> dict | None:
    """The router's recorded accuracy: {accuracy, source, what} or None when nothing is recorded.

    `eval_report` (a `mole eval router` report) must exist and match the adapter's weights. Without
    it, EVAL_REPORT_FILE beside the checkpoint or its adapter counts when it matches; then the
    validation accuracy of router_info.json.
    """
    adapter = find_adapter_dir(checkpoint)
    digest = adapter_digest(adapter)
    folders = list(dict.fromkeys([Path(checkpoint), adapter, adapter.parent]))
    if eval_report is not None:
        report = _read_json(Path(eval_report), "an evaluation report")
        if report.get("adapter_sha256") != digest:
            raise UserError(
                f"{eval_report}: this report is not of the router weights in {adapter} (it "
                + ("records other weights" if report.get("adapter_sha256") else "records no adapter sha256")
                + "); run `mole eval router` on this checkpoint again"
            )
        return _from_report(report, eval_report)
    for folder in folders:
        path = folder / EVAL_REPORT_FILE
        if path.is_file():
            report = _read_json(path, "an evaluation report")
            if report.get("adapter_sha256") == digest:
                return _from_report(report, path)
    for folder in folders:
        path = folder / ROUTER_INFO_FILE
        if path.is_file():
            info = _read_json(path, "router training info")
            accuracy = (info.get("best") or {}).get("val_accuracy")
            if isinstance(accuracy, int | float):
                return {"accuracy": float(accuracy), "source": str(path), "what": "validation accuracy"}
    return None


HELD_OUT_SPLITS = ("test", "val")  # what a deploy gate may trust: records the router never trained on


def _from_report(report: dict, path: str | Path) -> dict:
    accuracy = report.get("accuracy")
    if not isinstance(accuracy, int | float):
        raise UserError(f"{path}: no 'accuracy' in this report (expected a `mole eval router` report)")
    if report.get("split") not in HELD_OUT_SPLITS:
        # all records, or the train split, include what the router was trained on
        raise UserError(
            f"{path}: this report is of the {report.get('split') or 'whole'} data, not a held-out split "
            f"({' or '.join(HELD_OUT_SPLITS)}); run `mole eval router --split test` for the gate"
        )
    return {
        "accuracy": float(accuracy),
        "source": str(path),
        "what": f"{report.get('split') or 'all'} accuracy",
    }


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found (expected {what})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object ({what})")
    return data


def check_deployable(
    checkpoint: str | Path, min_accuracy: float, force: bool = False, eval_report: str | Path | None = None
) -> dict:
    """The gate of `mole deploy --min-accuracy`: the recorded evaluation, or an error when it falls short.

    Raises BelowThreshold (exit 1) below the minimum and a UserError (exit 2) when no evaluation is
    recorded, unless `force`; returns {accuracy, source, what, forced} (accuracy None: none recorded).
    """
    rec = recorded_evaluation(checkpoint, eval_report)
    if rec is None:
        if not force:
            raise UserError(
                f"{checkpoint}: no recorded evaluation of this router (no {EVAL_REPORT_FILE} of `mole eval "
                f"router` for these weights, no {ROUTER_INFO_FILE}), so --min-accuracy {min_accuracy:g} "
                "cannot be checked; run `mole eval router --checkpoint CKPT --test-data FILE` first, or "
                "pass --force to deploy anyway"
            )
        return {"accuracy": None, "source": None, "what": None, "forced": True}
    if rec["accuracy"] < min_accuracy and not force:
        raise BelowThreshold(
            f"{checkpoint}: router {rec['what']} {rec['accuracy']:.4f} (from {rec['source']}) is below "
            f"--min-accuracy {min_accuracy:g}; not deployed (pass --force to deploy anyway)"
        )
    return {**rec, "forced": rec["accuracy"] < min_accuracy}


def format_gate(gate: dict) -> str:
    """One line saying what the deploy gate checked and why the router passed (or was forced)."""
    if gate["accuracy"] is None:
        return f"router: no recorded evaluation; deployed anyway (--force, --min-accuracy {gate['min_accuracy']:g})"
    sign = "<" if gate["forced"] else ">="
    tail = "; deployed anyway (--force)" if gate["forced"] else ""
    return (
        f"router {gate['what']} {gate['accuracy']:.4f} (from {gate['source']}) {sign} "
        f"--min-accuracy {gate['min_accuracy']:g}{tail}"
    )
