"""Router evaluation metrics computed from a probability matrix.

Inputs follow one convention throughout: ``probs`` has shape [n, K] (a list of lists or a numpy
array, each row a distribution over the K experts), ``labels`` holds the n true class indices and
``names`` the K expert names in label-index order. Predictions are the argmax of each row; ties go
to the lower index, as in ``numpy.argmax``.

scikit-learn computes the standard metrics (accuracy, top-k, confusion, precision / recall / F1,
log-loss, Brier); the calibration bins and ECE, which it does not offer in this form, are ours.
scikit-learn is imported inside the functions so that importing this module (and `mole --help`)
stays cheap.

Every function returns plain Python numbers, lists and dicts so results can be written as JSON.
Shape mismatches and out-of-range labels are programming errors and raise ValueError.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

# how far a row of probs may sum from 1 (low-precision softmax outputs are not exact)
_ROW_SUM_TOL = 1e-2
# floor on the true-class probability in the NLL, so a confident miss costs ~27.6 nats, not inf
_NLL_EPS = 1e-12


def _as_probs(probs) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"probs must have shape [n, K] with n, K >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("probs must be finite and within [0, 1]")
    sums = arr.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOL)
    if bad.size:
        raise ValueError(f"probs rows must sum to 1; row {int(bad[0])} sums to {sums[bad[0]]:.4f}")
    return arr


def _as_labels(labels, n: int, k: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"expected {n} labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    out = np.flatnonzero((arr < 0) | (arr >= k))
    if out.size:
        raise ValueError(f"label {int(arr[out[0]])} at position {int(out[0])} is outside [0, {k})")
    return arr


def _check_names(names: Sequence[str], k: int) -> None:
    if len(names) != k:
        raise ValueError(f"expected {k} names (one per column of probs), got {len(names)}")


def predictions(probs) -> list[int]:
    """The predicted class of each row: argmax, ties broken by the lower index."""
    return [int(i) for i in np.argmax(_as_probs(probs), axis=1)]


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax equals the label."""
    return top_k_accuracy(probs, labels, 1)


def top_k_accuracy(probs, labels, k: int) -> float:
    """Fraction of rows whose label is among the k most probable classes.

    k is clipped to K. Among equal probabilities the lower index ranks first, so with ties a label
    with a higher index may fall outside the top k even though its probability equals the k-th.
    """
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    p = _as_probs(probs)
    y = _as_labels(labels, *p.shape)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_classes = p.shape[1]
    if k >= n_classes:
        return 1.0  # every label is among all K classes
    if k == 1:
        return float(accuracy_score(y, np.argmax(p, axis=1)))
    # here K >= 3, scikit-learn's multiclass case. It ranks equal scores higher index first; on the
    # columns reversed (label i becomes K-1-i) that is lower original index first, as argmax does.
    reversed_labels = n_classes - 1 - y
    return float(top_k_accuracy_score(reversed_labels, p[:, ::-1], k=k, labels=np.arange(n_classes)))


def confusion_matrix(pred, labels, k: int) -> list[list[int]]:
    """K x K counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    y = _as_labels(labels, len(labels), k)
    p = _as_labels(pred, len(y), k)
    with warnings.catch_warnings():
        # it warns about a 1 x 1 matrix (K == 1) even when labels names that one class
        warnings.simplefilter("ignore", UserWarning)
        return sk_confusion_matrix(y, p, labels=np.arange(k)).tolist()


def per_class_prf(pred, labels, names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support per class, keyed by name; 0.0 where a ratio is undefined."""
    from sklearn.metrics import precision_recall_fscore_support

    y = _as_labels(labels, len(labels), len(names))
    p = _as_labels(pred, len(y), len(names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, p, labels=np.arange(len(names)), average=None, zero_division=0.0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }


def macro_averages(prf: dict[str, dict[str, float | int]]) -> dict[str, float]:
    """Unweighted mean of precision, recall and F1 over all classes of a per_class_prf result."""
    keys = ("precision", "recall", "f1")
    if not prf:
        return dict.fromkeys(keys, 0.0)
    return {key: float(np.mean([row[key] for row in prf.values()])) for key in keys}


def calibration_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """Reliability-diagram bins over the confidence (max probability of each row).

    Bins are equal-width and right-closed: (lo, hi], the first one also holds 0. Each bin gives
    count, mean confidence and accuracy; the means are None for an empty bin.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, *p.shape)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = p.max(axis=1)
    correct = np.argmax(p, axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "confidence": float(conf[mask].mean()) if count else None,
                "accuracy": float(correct[mask].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(probs, labels, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over the bins of calibration_bins."""
    return _ece(calibration_bins(probs, labels, n_bins))


def _ece(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / n)


def _two_or_more_columns(p: np.ndarray) -> np.ndarray:
    """p with a zero column appended when K == 1.

    scikit-learn reads a single column as the probability of a positive class (and refuses log-loss
    for one label); a never-true class of probability 0 adds nothing to either score.
    """
    return np.hstack([p, np.zeros_like(p)]) if p.shape[1] == 1 else p


def brier_score(probs, labels) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - onehot_k)^2, in [0, 2]."""
    from sklearn.metrics import brier_score_loss

    p = _as_probs(probs)
    y = _as_labels(labels, *p.shape)
    p = _two_or_more_columns(p)
    with warnings.catch_warnings():
        # rows may sum to 1 only within _ROW_SUM_TOL (low-precision softmax), which it warns about
        warnings.simplefilter("ignore", UserWarning)
        return float(brier_score_loss(y, p, labels=np.arange(p.shape[1]), scale_by_half=False))


def mean_nll(probs, labels) -> float:
    """Mean negative log-likelihood (nats) of the true class; probabilities are floored at 1e-12."""
    from sklearn.metrics import log_loss

    p = _as_probs(probs)
    y = _as_labels(labels, *p.shape)
    # our floor, not scikit-learn's machine-epsilon clip, keeps a confident miss at ~27.6 nats
    p = _two_or_more_columns(np.maximum(p, _NLL_EPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rows summing to 1 only within _ROW_SUM_TOL
        return float(log_loss(y, p, labels=np.arange(p.shape[1])))


def router_report(probs, labels, names: Sequence[str], ks: Sequence[int] = (1, 2), n_bins: int = 10) -> dict:
    """Every router metric in one JSON-serialisable dict.

    Keys: n, accuracy, top_k (keyed by str(k) as requested, k clipped to K), per_expert
    (per_class_prf), macro_f1, confusion ({"labels": names, "matrix": rows true / cols predicted})
    and calibration ({"ece", "brier", "nll", "bins"}).
    """
    p = _as_probs(probs)
    _check_names(names, p.shape[1])
    y = _as_labels(labels, *p.shape)
    pred = predictions(p)
    per_expert = per_class_prf(pred, y, names)
    bins = calibration_bins(p, y, n_bins)
    return {
        "n": int(p.shape[0]),
        "accuracy": accuracy(p, y),
        "top_k": {str(k): top_k_accuracy(p, y, k) for k in ks},
        "per_expert": per_expert,
        "macro_f1": macro_averages(per_expert)["f1"],
        "confusion": {"labels": list(names), "matrix": confusion_matrix(pred, y, len(names))},
        "calibration": {
            "ece": _ece(bins),
            "brier": brier_score(p, y),
            "nll": mean_nll(p, y),
            "bins": bins,
        },
    }
