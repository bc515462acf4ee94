"""The scikit-learn / rapidfuzz metrics give the numbers of the hand-written ones they replaced.

The `_old_*` functions below are the numpy / pure-Python implementations eval/metrics.py and
eval/task_metrics.py had before (kept here as the oracle). Counts and ratios of counts must match
exactly; float reductions (F1, Brier, log-loss) to 1e-12.
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from mole_trainer.eval import metrics as m
from mole_trainer.eval.task_metrics import char_similarity, levenshtein

FLOAT_TOL = 1e-12


def _old_top_k(p: np.ndarray, y: np.ndarray, k: int) -> float:
    top = np.argsort(-p, axis=1, kind="stable")[:, : min(k, p.shape[1])]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def _old_confusion(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    mat = np.zeros((k, k), dtype=np.int64)
    np.add.at(mat, (y, pred), 1)
    return mat


def _old_prf(pred: np.ndarray, y: np.ndarray, k: int) -> list[tuple[float, float, float, int]]:
    mat = _old_confusion(pred, y, k)
    rows = []
    for i in range(k):
        tp, predicted, support = mat[i, i], mat[:, i].sum(), mat[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((float(precision), float(recall), float(f1), int(support)))
    return rows


def _old_brier(p: np.ndarray, y: np.ndarray) -> float:
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _old_nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def _old_levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _random_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Peaked softmax rows, some exact ties and zeros, some rows summing to 1 only within 1e-3."""
    p = rng.dirichlet(np.full(k, 0.3), size=n)
    p[::7] = 1.0 / k  # all-equal rows: ties at every rank
    if k > 2:
        p[1::11, :] = 0.0
        p[1::11, :2] = 0.5  # a two-way tie for the top, zeros elsewhere
    p[2::13] *= 0.999
    return p


def _case(name: str, probs, labels) -> tuple[str, np.ndarray, np.ndarray]:
    return name, np.asarray(probs, dtype=np.float64), np.asarray(labels)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(12)
    k16 = _random_probs(rng, 300, 16)
    k16_labels = rng.integers(0, 16, 300)
    k16_labels[k16_labels == 5] = 6  # expert 5 never a label (it is still predicted now and then)
    k16[:, 9] = 0.0  # expert 9 neither a label nor predicted
    k16 /= k16.sum(axis=1, keepdims=True)
    k16_labels[k16_labels == 9] = 10
    k5 = _random_probs(rng, 60, 5)
    k5[:, 3] = 0.0  # expert 3 is never predicted, yet is a label below
    k5 /= k5.sum(axis=1, keepdims=True)
    return [
        _case("k16", k16, k16_labels),
        _case("k5-never-predicted", k5, rng.integers(0, 5, 60)),
        _case("k2", _random_probs(rng, 40, 2), rng.integers(0, 2, 40)),
        _case("k2-one-label-only", _random_probs(rng, 9, 2), np.zeros(9, dtype=int)),
        _case("k1", [[1.0], [0.995], [1.0]], [0, 0, 0]),
        # the true class has probability 0: the 1e-12 floor caps the loss at ~27.6 nats
        _case("confident-misses", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], [2, 0, 1]),
    ]


CASES = _cases()


def test_the_cases_cover_the_edge_cases():
    by_name = {name: (p, y) for name, p, y in CASES}
    p, y = by_name["k16"]
    assert 5 not in y and 5 in p.argmax(axis=1)
    assert 9 not in y and 9 not in p.argmax(axis=1)
    p, y = by_name["k5-never-predicted"]
    assert 3 in y and 3 not in p.argmax(axis=1)
    assert any(np.sum(row == row.max()) > 1 for row in p)  # ties
    p, y = by_name["confident-misses"]
    assert np.any(p[np.arange(len(y)), y] == 0.0)


@pytest.mark.parametrize(("name", "probs", "labels"), CASES, ids=[c[0] for c in CASES])
def test_router_report_matches_the_old_implementation(name, probs, labels):
    k = probs.shape[1]
    names = [f"e{i}" for i in range(k)]
    ks = (1, 2, 3, 5, 16, 99)
    report = m.router_report(probs, labels.tolist(), names, ks=ks)
    pred = probs.argmax(axis=1)

    assert report["top_k"] == {str(kk): _old_top_k(probs, labels, kk) for kk in ks}
    assert report["accuracy"] == _old_top_k(probs, labels, 1)
    assert report["confusion"]["matrix"] == _old_confusion(pred, labels, k).tolist()
    old_prf = _old_prf(pred, labels, k)
    for (precision, recall, f1, support), name_ in zip(old_prf, names, strict=True):
        row = report["per_expert"][name_]
        assert row["support"] == support
        assert row["precision"] == precision
        assert row["recall"] == recall
        assert row["f1"] == pytest.approx(f1, abs=FLOAT_TOL)
    assert report["macro_f1"] == pytest.approx(float(np.mean([r[2] for r in old_prf])), abs=FLOAT_TOL)
    assert report["calibration"]["brier"] == pytest.approx(_old_brier(probs, labels), abs=FLOAT_TOL)
    assert report["calibration"]["nll"] == pytest.approx(_old_nll(probs, labels), abs=FLOAT_TOL)


def test_edit_distance_matches_the_old_implementation():
    fixed = [("kitten", "sitting"), ("", "abc"), ("abc", ""), ("", ""), ("flaw", "lawn"), ("ñandú", "nandu")]
    fixed += [("Sign in 🔒", "Sign-in"), ("Résumé", "resume"), ("abcdef", "fedcba")]
    rnd = random.Random(12)
    alphabet = "ab c1é"
    for _ in range(300):
        fixed.append(tuple("".join(rnd.choices(alphabet, k=rnd.randint(0, 12))) for _ in range(2)))
    for a, b in fixed:
        assert levenshtein(a, b) == _old_levenshtein(a, b), (a, b)
        old_similarity = max(0.0, 1.0 - _old_levenshtein(a, b) / max(len(b), 1))
        assert char_similarity(a, b) == old_similarity, (a, b)


def test_importing_the_cli_and_metrics_leaves_sklearn_and_rapidfuzz_unloaded():
    code = (
        "import sys, contextlib, io\n"
        "import mole_trainer.eval.metrics, mole_trainer.eval.task_metrics\n"
        "from mole_trainer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "print('LOADED', sorted(m for m in ('sklearn', 'scipy', 'rapidfuzz') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "LOADED []" in res.stdout, res.stdout + res.stderr
