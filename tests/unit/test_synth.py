"""Synthetic expert datasets: determinism, counts, loading, and answers consistent with metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.synth import SYNTH_EXPERTS, SYNTH_TASKS, synthesize
from mole_trainer.errors import UserError
from mole_trainer.eval.task_metrics import TASK_METRICS, parse_action, score

COUNTS = {"train": 6, "val": 2, "test": 4}
SIZES = [(448, 336), (320, 240)]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def synth(request, tmp_path_factory):
    """(root, image size, {expert: {split: samples}}) of one generated set per image size."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, counts=COUNTS, seed=3, image_size=request.param)
    return root, request.param, {e: load_expert_dataset(root / e) for e in SYNTH_EXPERTS}


def _samples(data, expert):
    return [s for split in data[expert].values() for s in split]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _inside(point, box, size) -> bool:
    """Whether a 0-1000 point lies in a pixel box (scaled to 0-1000)."""
    x, y = point
    w, h = size
    return box[0] * 1000 / w <= x <= box[2] * 1000 / w and box[1] * 1000 / h <= y <= box[3] * 1000 / h


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    counts = {"train": 2, "val": 1, "test": 1}
    synthesize(tmp_path / "a", counts=counts, seed=7)
    synthesize(tmp_path / "b", counts=counts, seed=7)
    synthesize(tmp_path / "c", counts=counts, seed=8)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


# sha256 over (relative name, sha256 of bytes) of every file of synthesize(counts=PINNED_COUNTS, seed=0) at
# the default size, made with the single-module synth.py before it became a package (pillow 13.0.0).
PINNED_COUNTS = {"train": 2, "val": 1, "test": 1}
PINNED_DIGEST = "3600ed9d5b0393e2fb94f48b79844719d84f6b9ab976179889ac4d71ea8485a9"


def test_output_is_pinned_across_refactors(tmp_path):
    """Same arguments, same bytes as ever: a change to a generator's draws or drawing shows here.

    If a change to the data is intended, regenerate PINNED_DIGEST and say so in the commit (old
    preprocessed caches and runs then no longer match the synthetic data).
    """
    synthesize(tmp_path, counts=PINNED_COUNTS, seed=0)
    h = hashlib.sha256()
    for name, data in _files(tmp_path).items():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    assert h.hexdigest() == PINNED_DIGEST


def test_counts_ids_and_metadata(synth):
    root, _, data = synth
    ids = set()
    for expert in SYNTH_EXPERTS:
        for split, samples in data[expert].items():
            assert len(samples) == COUNTS[split]
            for s in samples:
                assert s.id == f"{expert}-{split}-{int(s.id[-5:]):05d}"
                assert (s.expert, s.split) == (expert, split)
                assert s.metadata["expert"] == expert and s.metadata["task"] == SYNTH_TASKS[expert]
                assert s.images == [(root / expert / "images" / f"{s.id}.png").resolve()]
                ids.add(s.id)
    assert len(ids) == len(SYNTH_EXPERTS) * sum(COUNTS.values())
    assert set(SYNTH_TASKS.values()) <= set(TASK_METRICS)


def test_images_are_distinct_and_sized(synth):
    _, size, data = synth
    digests = set()
    for expert in SYNTH_EXPERTS:
        for s in _samples(data, expert):
            with Image.open(s.images[0]) as im:
                assert im.size == size
            digests.add(hashlib.sha256(s.images[0].read_bytes()).hexdigest())
    assert len(digests) == len(SYNTH_EXPERTS) * sum(COUNTS.values())


def test_answers_score_one_against_themselves(synth):
    _, _, data = synth
    for expert in SYNTH_EXPERTS:
        for s in _samples(data, expert):
            assert score(SYNTH_TASKS[expert], s.answer, s.answer) == 1.0


def test_calendar_click_inside_target_cell(synth):
    _, size, data = synth
    for s in _samples(data, "calendar"):
        m = s.metadata
        act = parse_action(s.answer)
        assert act is not None and act.name == "click"
        assert _inside((act.x, act.y), m["box"], size)
        assert 0 <= m["box"][0] < m["box"][2] <= size[0] and 0 <= m["box"][1] < m["box"][3] <= size[1]
        assert str(m["day"]) in s.instruction or f"{m['day']:02d}" in s.instruction


def test_login_action_matches_metadata(synth):
    _, size, data = synth
    for s in _samples(data, "login-window"):
        m = s.metadata
        act = parse_action(s.answer)
        assert act is not None
        assert {"name": act.name, "x": act.x, "y": act.y} == {k: m["action"][k] for k in ("name", "x", "y")}
        assert act.text == m["action"].get("text")
        assert _inside((act.x, act.y), m["boxes"][m["target"]], size)
        assert {"username", "password", "login"} <= m["boxes"].keys()
        if act.name == "type":
            assert act.text in s.instruction


def test_chart_answer_matches_values(synth):
    _, _, data = synth
    for s in _samples(data, "chart-screen"):
        m = s.metadata
        names, values = m["series"], m["values"]
        assert 2 <= len(names) == len(values) <= 4 and all(isinstance(v, int) for v in values)
        expected = {
            "max": names[values.index(max(values))],
            "min": names[values.index(min(values))],
            "value": str(values[names.index(m["target"])]),
        }[m["question"]]
        assert s.answer == expected


def test_ocr_lines_and_boxes(synth):
    _, size, data = synth
    for s in _samples(data, "ocr"):
        m = s.metadata
        assert s.answer == "\n".join(m["lines"])
        assert 2 <= len(m["lines"]) == len(m["boxes"]) <= 6
        with Image.open(s.images[0]) as im:
            grey = im.convert("L")
            for box in m["boxes"]:
                assert 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]
                lo, hi = grey.crop(box).getextrema()
                assert hi - lo > 60, f"{s.id}: no ink in {box}"


def test_default_counts_and_subset(tmp_path, monkeypatch):
    monkeypatch.setattr("mole_trainer.data.synth.DEFAULT_COUNTS", {"train": 2, "val": 1, "test": 1})
    assert synthesize(tmp_path, experts=["ocr"]) == {"ocr": {"train": 2, "val": 1, "test": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ocr"]


def test_missing_split_gets_an_empty_file(tmp_path):
    assert synthesize(tmp_path, experts="calendar", counts={"train": 1}) == {
        "calendar": {"train": 1, "val": 0, "test": 0}
    }
    assert (tmp_path / "calendar" / "val.jsonl").read_text() == ""


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="calendar, login-window, chart-screen, ocr"):
        synthesize(tmp_path, experts=["calendar", "weather"])
    with pytest.raises(UserError, match="unknown split"):
        synthesize(tmp_path, counts={"dev": 1})
    with pytest.raises(UserError, match="non-negative"):
        synthesize(tmp_path, counts={"train": -1})
    with pytest.raises(UserError, match="too small"):
        synthesize(tmp_path, image_size=(200, 150))
