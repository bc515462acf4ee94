"""Task metrics for expert outputs: each score lies in [0, 1], higher is better, with partial credit.

Coordinates are in 0-1000 units of the image width / height, as in the synthetic answers
(`click(x=512, y=604)`, `type(x=.., y=.., text="jdoe")`). Partial credit lets a model that has learned
a little (the answer format, roughly where to click, most characters) score above one that outputs
garbage, which scores 0. An unparseable *reference* is a data bug and raises ValueError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TASK_METRICS: dict[str, str] = {
    "click": "click_score",
    "action": "action_score",
    "chart_qa": "answer_score",
    "ocr": "char_similarity",
    "text": "char_similarity",  # any other dataset: free text compared character by character
}
CLICK_RADIUS = 250  # distance in 0-1000 units at which click credit reaches 0

_NUM = r"[-+]?\d+(?:\.\d+)?"
_CALL_RE = re.compile(r"\b(click|type)\s*\(", re.IGNORECASE)
_X_RE = re.compile(rf"\bx\s*[=:]\s*({_NUM})")
_Y_RE = re.compile(rf"\by\s*[=:]\s*({_NUM})")
_TEXT_RE = re.compile(r"""\btext\s*[=:]\s*("(?:[^"\\]|\\.)*"|'[^']*')""")
_INT_RE = re.compile(r"[-+]?\d+")


@dataclass(frozen=True)
class Action:
    """A parsed tool call: name ("click" or "type"), a point in 0-1000 units, the typed text."""

    name: str
    x: float
    y: float
    text: str | None = None


def parse_action(text: str) -> Action | None:
    """The first `click(...)` or `type(...)` call in text; None when there is none or x / y is missing.

    Spaces are tolerated; a `type` call without a text argument gets the empty text.
    """
    call = _CALL_RE.search(text)
    if call is None:
        return None
    rest = text[call.end() :]
    x, y = _X_RE.search(rest), _Y_RE.search(rest)
    if x is None or y is None:
        return None
    name = call.group(1).lower()
    typed = None
    if name == "type":
        m = _TEXT_RE.search(rest)
        typed = _unquote(m.group(1)) if m else ""
    return Action(name, float(x.group(1)), float(y.group(1)), typed)


def _unquote(literal: str) -> str:
    if literal.startswith('"'):
        try:
            return json.loads(literal)
        except json.JSONDecodeError:
            pass
    return literal[1:-1]


def _reference_action(reference: str, names: tuple[str, ...]) -> Action:
    ref = parse_action(reference)
    if ref is None or ref.name not in names:
        raise ValueError(f"reference {reference!r} is not a {' or '.join(n + '(...)' for n in names)} call")
    return ref


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def char_similarity(prediction: str, reference: str) -> float:
    """1 - levenshtein / len(reference), floored at 0."""
    return max(0.0, 1.0 - levenshtein(prediction, reference) / max(len(reference), 1))


def _proximity(p: Action, r: Action) -> float:
    return max(0.0, 1.0 - math.hypot(p.x - r.x, p.y - r.y) / CLICK_RADIUS)


def click_score(prediction: str, reference: str) -> float:
    """max(0, 1 - distance / 250) between the predicted and the reference click; 0 without a click."""
    ref = _reference_action(reference, ("click",))
    pred = parse_action(prediction)
    if pred is None or pred.name != "click":
        return 0.0
    return _proximity(pred, ref)


def action_score(prediction: str, reference: str) -> float:
    """0.25 for the right action name + 0.5 x click proximity + 0.25 x (text similarity for type, 1 for click).

    The last part counts only when the names match; an unparseable prediction scores 0.
    """
    ref = _reference_action(reference, ("click", "type"))
    pred = parse_action(prediction)
    if pred is None:
        return 0.0
    score = 0.5 * _proximity(pred, ref)
    if pred.name == ref.name:
        detail = char_similarity(pred.text or "", ref.text or "") if ref.name == "type" else 1.0
        score += 0.25 + 0.25 * detail
    return score


def _normalize_answer(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?'\"")


def answer_score(prediction: str, reference: str) -> float:
    """1 for a case / space-insensitive match; relative closeness for an integer reference; else 0."""
    if _normalize_answer(prediction) == _normalize_answer(reference):
        return 1.0
    if not _INT_RE.fullmatch(reference.strip()):
        return 0.0
    found = _INT_RE.search(prediction)
    if found is None:
        return 0.0
    ref, pred = int(reference), int(found.group())
    return max(0.0, 1.0 - abs(pred - ref) / max(abs(ref), 1))


_SCORERS: dict[str, Callable[[str, str], float]] = {
    "click": click_score,
    "action": action_score,
    "chart_qa": answer_score,
    "ocr": char_similarity,
    "text": char_similarity,
}


def _scorer(task: str) -> Callable[[str, str], float]:
    if task not in _SCORERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_METRICS)}")
    return _SCORERS[task]


def score(task: str, prediction: str, reference: str) -> float:
    """Score one prediction against its reference with the task's metric (in [0, 1])."""
    return _scorer(task)(prediction, reference)


def _exact(task: str, prediction: str, reference: str) -> bool:
    if task == "chart_qa":
        return _normalize_answer(prediction) == _normalize_answer(reference)
    if task in ("click", "action"):
        return parse_action(prediction) == parse_action(reference)
    return prediction == reference


def score_many(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean task score over pairs: {"metric", "value", "n", "exact_match"} (+ "parse_rate" for tool calls).

    exact_match counts identical answers (parsed calls for click / action, normalized text for chart_qa);
    parse_rate is the share of predictions holding a parseable click / type call.
    """
    scorer = _scorer(task)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    pairs = list(zip(predictions, references, strict=True))
    out = {
        "metric": TASK_METRICS[task],
        "value": sum(scorer(p, r) for p, r in pairs) / n if n else 0.0,
        "n": n,
        "exact_match": sum(_exact(task, p, r) for p, r in pairs) / n if n else 0.0,
    }
    if task in ("click", "action"):
        out["parse_rate"] = sum(parse_action(p) is not None for p in predictions) / n if n else 0.0
    return out
