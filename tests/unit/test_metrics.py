"""Router metrics on small hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mole_trainer.eval import metrics as m

NAMES = ["a", "b", "c"]
PERFECT = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
# rows: true a -> a, true a -> b, true b -> b, true c -> b (confidences 0.6, 0.7, 0.8, 0.5)
KNOWN = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.5, 0.4]]
KNOWN_LABELS = [0, 0, 1, 2]


def test_perfect_predictions():
    labels = [0, 1, 2]
    assert m.accuracy(PERFECT, labels) == 1.0
    assert m.confusion_matrix(m.predictions(PERFECT), labels, 3) == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    prf = m.per_class_prf(m.predictions(PERFECT), labels, NAMES)
    assert all(row == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for row in prf.values())
    assert m.expected_calibration_error(PERFECT, labels) == 0.0
    assert m.brier_score(PERFECT, labels) == 0.0
    # scikit-learn's log-loss clips p to 1 - machine epsilon: -log(1 - 2.2e-16), not exactly 0
    assert m.mean_nll(PERFECT, labels) == pytest.approx(0.0, abs=1e-15)


def test_all_wrong_predictions():
    labels = [1, 2, 0]
    assert m.accuracy(PERFECT, labels) == 0.0
    prf = m.per_class_prf(m.predictions(PERFECT), labels, NAMES)
    assert all(row["precision"] == row["recall"] == row["f1"] == 0.0 for row in prf.values())
    assert m.expected_calibration_error(PERFECT, labels) == 1.0
    assert m.brier_score(PERFECT, labels) == 2.0
    assert m.mean_nll(PERFECT, labels) == pytest.approx(-math.log(1e-12))


def test_known_confusion_and_prf():
    pred = m.predictions(KNOWN)
    assert pred == [0, 1, 1, 1]
    assert m.accuracy(KNOWN, KNOWN_LABELS) == 0.5
    assert m.confusion_matrix(pred, KNOWN_LABELS, 3) == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    prf = m.per_class_prf(pred, KNOWN_LABELS, NAMES)
    assert prf["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert prf["b"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": 0.5, "support": 1}
    # c is never predicted: precision undefined -> 0, not NaN
    assert prf["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    macro = m.macro_averages(prf)
    assert macro["f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert macro["precision"] == pytest.approx((1 + 1 / 3) / 3)


def test_top_k_with_clipping_and_ties():
    assert m.top_k_accuracy(KNOWN, KNOWN_LABELS, 2) == 1.0
    assert m.top_k_accuracy(KNOWN, KNOWN_LABELS, 99) == 1.0
    tie = [[0.5, 0.5, 0.0]]
    assert m.top_k_accuracy(tie, [0], 1) == 1.0
    assert m.top_k_accuracy(tie, [1], 1) == 0.0  # lower index wins the tie
    assert m.predictions(tie) == [0]


def test_ece_known_case():
    # confidences 0.6 / 0.7 / 0.8 / 0.5 fall in bins (0.5,0.6], (0.6,0.7], (0.7,0.8], (0.4,0.5]
    # correct: yes / no / yes / no -> |1-.6| + |0-.7| + |1-.8| + |0-.5| = 1.8, / 4
    assert m.expected_calibration_error(KNOWN, KNOWN_LABELS) == pytest.approx(0.45)
    # two bins: (0,.5] holds 0.5 (wrong), (.5,1] holds 0.6, 0.7, 0.8 (2 of 3 right)
    two = m.calibration_bins(KNOWN, KNOWN_LABELS, n_bins=2)
    assert [b["count"] for b in two] == [1, 3]
    assert two[1]["confidence"] == pytest.approx(0.7)
    assert two[1]["accuracy"] == pytest.approx(2 / 3)
    assert m.expected_calibration_error(KNOWN, KNOWN_LABELS, n_bins=2) == pytest.approx(
        (1 * 0.5 + 3 * abs(2 / 3 - 0.7)) / 4
    )


def test_brier_and_nll_known_case():
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]
    labels = [0, 1]
    # (0.16 + 0.09 + 0.01) and (0.04 + 0.09 + 0.01)
    assert m.brier_score(probs, labels) == pytest.approx((0.26 + 0.14) / 2)
    assert m.mean_nll(probs, labels) == pytest.approx(-(math.log(0.6) + math.log(0.7)) / 2)


def test_router_report_is_json_and_consistent():
    report = m.router_report(np.array(KNOWN), KNOWN_LABELS, NAMES)
    json.dumps(report, allow_nan=False)
    assert report["n"] == 4
    assert report["accuracy"] == 0.5
    assert report["top_k"] == {"1": 0.5, "2": 1.0}
    assert report["confusion"] == {"labels": NAMES, "matrix": [[1, 1, 0], [0, 1, 0], [0, 1, 0]]}
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 3)
    assert report["calibration"]["ece"] == pytest.approx(0.45)
    assert len(report["calibration"]["bins"]) == 10
    assert set(report["per_expert"]) == set(NAMES)


@pytest.mark.parametrize(
    ("probs", "labels"),
    [
        ([[0.5, 0.5]], [0, 1]),  # length mismatch
        ([[0.5, 0.5]], [2]),  # label out of range
        ([[0.5, 0.5]], [-1]),
        ([0.5, 0.5], [0]),  # not 2-D
        ([[0.9, 0.9]], [0]),  # row does not sum to 1
        ([[1.004, 0.0]], [0]),  # sums to 1 within the tolerance, but 1.004 is no probability
        ([[0.5, 0.5]], [0.0]),  # float label
    ],
)
def test_bad_inputs_raise_value_error(probs, labels):
    with pytest.raises(ValueError):
        m.accuracy(probs, labels)


def test_names_length_mismatch():
    with pytest.raises(ValueError, match="names"):
        m.router_report(PERFECT, [0, 1, 2], ["a", "b"])
