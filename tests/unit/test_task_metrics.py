"""Task metrics: ranges, partial credit, garbage scores 0, exact answers score 1."""

from __future__ import annotations

import pytest

from mole_trainer.eval.task_metrics import (
    TASK_METRICS,
    Action,
    char_similarity,
    levenshtein,
    parse_action,
    score,
    score_many,
)

# output of an untrained model: no tool call, no number, nothing or far too much
GARBAGE = ("", "asdf qwer", "<|endoftext|>", "click", "click(x=)", "}{][", "zq" * 40)
# OCR credits every shared character, so only empty or overlong output scores exactly 0
OCR_GARBAGE = ("", "zq" * 40)
REFERENCES = {
    "click": "click(x=512, y=604)",
    "action": 'type(x=300, y=400, text="jdoe")',
    "chart_qa": "42",
    "ocr": "Coffee 3.50\nTotal 3.50",
    "text": "The form has two fields.",
}


@pytest.mark.parametrize("task", sorted(TASK_METRICS))
def test_exact_answer_scores_one(task):
    assert score(task, REFERENCES[task], REFERENCES[task]) == 1.0


@pytest.mark.parametrize("task", ["click", "action", "chart_qa"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_scores_zero(task, garbage):
    assert score(task, garbage, REFERENCES[task]) == 0.0


def test_ocr_garbage_scores_zero_or_low():
    for garbage in OCR_GARBAGE:
        assert score("ocr", garbage, REFERENCES["ocr"]) == 0.0
    for garbage in GARBAGE:
        assert score("ocr", garbage, REFERENCES["ocr"]) < 0.3


def test_parse_action_tolerates_spaces_and_quotes():
    assert parse_action("click( x = 10 ,y=20.5 )") == Action("click", 10.0, 20.5)
    assert parse_action("I will CLICK(x=1, y=2) now") == Action("click", 1.0, 2.0)
    assert parse_action('type(x=1, y=2, text="a \\"b\\"")') == Action("type", 1.0, 2.0, 'a "b"')
    assert parse_action("type(x=1, y=2, text='hi')") == Action("type", 1.0, 2.0, "hi")
    assert parse_action("type(x=1, y=2)") == Action("type", 1.0, 2.0, "")
    assert parse_action("click(x=1)") is None
    assert parse_action("scroll(x=1, y=2)") is None


def test_click_partial_credit_falls_with_distance():
    ref = "click(x=500, y=500)"
    assert score("click", "click(x=500,y=500)", ref) == 1.0
    assert score("click", "click(x=500, y=625)", ref) == pytest.approx(0.5)
    assert score("click", "click(x=650, y=700)", ref) == 0.0  # 250 away
    near, far = score("click", "click(x=510, y=500)", ref), score("click", "click(x=600, y=500)", ref)
    assert 1.0 > near > far > 0.0
    assert score("click", 'type(x=500, y=500, text="a")', ref) == 0.0


def test_action_score_parts():
    click_ref, type_ref = "click(x=500, y=500)", 'type(x=500, y=500, text="alice")'
    assert score("action", "click(x=500, y=500)", click_ref) == 1.0
    assert score("action", "click(x=900, y=900)", click_ref) == pytest.approx(0.5)  # name + click part
    assert score("action", 'type(x=500, y=500, text="x")', click_ref) == pytest.approx(0.5)  # place only
    assert score("action", 'type(x=500, y=500, text="alice")', type_ref) == 1.0
    assert score("action", 'type(x=500, y=500, text="alicx")', type_ref) == pytest.approx(0.95)
    assert score("action", "click(x=500, y=500)", type_ref) == pytest.approx(0.5)


def test_answer_score():
    assert score("chart_qa", "  q3 ", "Q3") == 1.0
    assert score("chart_qa", "North.", "north") == 1.0
    assert score("chart_qa", "South", "North") == 0.0
    assert score("chart_qa", "40", "50") == pytest.approx(0.8)
    assert score("chart_qa", "about 45 units", "50") == pytest.approx(0.9)
    assert score("chart_qa", "500", "50") == 0.0
    assert score("chart_qa", "1", "0") == 0.0
    assert score("chart_qa", "Q3", "50") == pytest.approx(1 - 47 / 50)


def test_levenshtein_and_char_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0
    assert char_similarity("Hello wor1d", "Hello world") == pytest.approx(1 - 1 / 11)
    assert char_similarity("x" * 100, "abc") == 0.0
    assert char_similarity("", "") == 1.0


def test_score_many():
    refs = ["click(x=500, y=500)", "click(x=100, y=100)", "click(x=0, y=0)"]
    preds = ["click(x=500, y=500)", "click(x=100, y=225)", "nonsense"]
    out = score_many("click", preds, refs)
    assert out == {
        "metric": "click_score",
        "value": pytest.approx(0.5),
        "n": 3,
        "exact_match": pytest.approx(1 / 3),
        "parse_rate": pytest.approx(2 / 3),
    }
    chart = score_many("chart_qa", ["q1", "The answer is 42"], ["Q1", "42"])
    assert chart["value"] == 1.0 and chart["exact_match"] == 0.5 and "parse_rate" not in chart
    assert score_many("ocr", [], [])["value"] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="unknown task"):
        score("translate", "a", "b")
    with pytest.raises(ValueError, match="unknown task"):
        score_many("translate", [], [])
    with pytest.raises(ValueError, match="references"):
        score_many("ocr", ["a"], [])
    with pytest.raises(ValueError, match="reference"):
        score("click", "click(x=1, y=1)", "not a click")
