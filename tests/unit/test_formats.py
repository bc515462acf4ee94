import json

import pytest
from PIL import Image

from mole_trainer.data.formats import load_expert_dataset, load_jsonl_samples
from mole_trainer.errors import UserError


def record(rid="r1", image="images/a.png", text="Click on the 3rd", answer="click(x=1, y=2)"):
    return {
        "id": rid,
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": answer},
        ],
    }


@pytest.fixture
def ds(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "images/a.png")
    return tmp_path


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_valid_record_loads(ds):
    write_lines(ds / "train.jsonl", [record()])
    splits = load_expert_dataset(ds)
    (s,) = splits["train"]
    assert s.instruction == "Click on the 3rd" and s.answer == "click(x=1, y=2)"
    assert s.images[0] == (ds / "images/a.png").resolve()
    assert splits["val"] == [] and splits["test"] == []


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{not json", "train.jsonl:2: not valid JSON"),
        ([1, 2], "train.jsonl:2: expected a JSON object"),
        (record(rid="r2", image="images/missing.png"), "does not exist"),
        (record(rid="r2", image="../outside.png"), "resolves outside the dataset root"),
        (record(rid="r1"), "duplicate id 'r1'"),
        (record(rid="r2", answer=""), "assistant answer is empty"),
        (record(rid="r2", text="  "), "no instruction text"),
        ({**record(rid="r2"), "images": "images/a.png"}, "'images' must be a non-empty list"),
        ({**record(rid="r2"), "messages": [{"role": "user", "content": "hi"}]}, "'messages' must be a list"),
        ({"images": ["images/a.png"]}, "'id' must be a non-empty string"),
        (
            {**record(rid="r2"), "messages": [*record()["messages"], {"role": "user", "content": "and?"}]},
            "exactly two turns",
        ),
    ],
)
def test_bad_records_name_file_and_line(ds, bad, fragment):
    (ds / "outside.png").write_bytes(b"")
    write_lines(ds / "train.jsonl", [record(), bad])
    with pytest.raises(UserError) as e:
        load_expert_dataset(ds)
    assert fragment in str(e.value)


def test_image_that_does_not_decode(ds):
    (ds / "images/broken.png").write_bytes(b"\x89PNG not really")
    write_lines(ds / "train.jsonl", [record(image="images/broken.png")])
    with pytest.raises(UserError, match=r"train.jsonl:1 \(id r1\).*cannot be decoded"):
        load_expert_dataset(ds)


def test_empty_dataset_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        load_expert_dataset(tmp_path / "nope")
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        load_expert_dataset(tmp_path)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_jsonl_samples(tmp_path / "x.jsonl")


def test_sharegpt_style_string_content_with_placeholder(ds):
    rec = record()
    rec["messages"][0]["content"] = "<image>\nClick on the 3rd"
    write_lines(ds / "train.jsonl", [rec])
    (s,) = load_expert_dataset(ds)["train"]
    assert s.instruction == "Click on the 3rd" and s.answer == "click(x=1, y=2)"


def test_records_without_a_task_are_scored_by_character_similarity(ds):
    from mole_trainer.train.experts import task_score

    write_lines(ds / "train.jsonl", [record()])
    samples = load_expert_dataset(ds)["train"]
    result = task_score(samples, ["click(x=1, y=2)"])
    assert result["metric"] == "char_similarity" and result["value"] == 1.0
    samples[0].metadata["task"] = "weather"
    with pytest.raises(UserError, match="metadata.task 'weather'"):
        task_score(samples, ["x"])
