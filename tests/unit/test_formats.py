import json

import pytest
from PIL import Image

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.records import load_jsonl_samples
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
        (
            {**record(rid="r2"), "messages": [{"role": "user", "content": "hi"}]},
            "the last message must be the assistant answer, got role 'user'",
        ),
        ({**record(rid="r2"), "messages": []}, "'messages' must be a non-empty list of turns"),
        ({"images": ["images/a.png"]}, "'id' must be a non-empty string"),
        (
            {**record(rid="r2"), "messages": [*record()["messages"], {"role": "user", "content": "and?"}]},
            "the last message must be the assistant answer",
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
    from mole_trainer.train.expert_jobs import task_score

    write_lines(ds / "train.jsonl", [record()])
    samples = load_expert_dataset(ds)["train"]
    result = task_score(samples, ["click(x=1, y=2)"])
    assert result["metric"] == "char_similarity" and result["value"] == 1.0
    samples[0].metadata["task"] = "weather"
    with pytest.raises(UserError, match="metadata.task 'weather'"):
        task_score(samples, ["x"])


# --- ShareGPT, Hugging Face datasets, conversion round trips ------------------------------------------


def test_sharegpt_records_load_with_image_or_images_and_derived_ids(ds):
    Image.new("RGB", (16, 16), "blue").save(ds / "images/b.png")
    lines = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nClick on the 3rd"},
                {"from": "gpt", "value": "click(x=1, y=2)"},
            ],
            "image": "images/a.png",
        },
        {
            "id": "two",
            "conversations": [
                {"from": "user", "value": "<image><image>Compare them"},
                {"from": "assistant", "value": "same"},
            ],
            "images": ["images/a.png", "images/b.png"],
            "metadata": {"task": "text"},
        },
    ]
    write_lines(ds / "val.jsonl", lines)
    a, b = load_expert_dataset(ds)["val"]
    assert (a.id, a.instruction, a.answer, a.images) == (
        "val-1",
        "Click on the 3rd",
        "click(x=1, y=2)",
        [(ds / "images/a.png").resolve()],
    )
    assert (b.id, b.instruction, len(b.images), b.metadata) == ("two", "Compare them", 2, {"task": "text"})


def test_lenient_read_keeps_good_records_and_lists_the_rest(ds):
    from mole_trainer.data.formats import read_dataset

    write_lines(ds / "train.jsonl", [record(), "{oops", record(rid="r2", image="images/gone.png"), record()])
    write_lines(ds / "test.jsonl", [record(rid="t1")])
    splits, rejects = read_dataset(ds, strict=False)
    assert [s.id for s in splits["train"]] == ["r1"] and [s.id for s in splits["test"]] == ["t1"]
    assert [(r.line, r.split) for r in rejects] == [(2, "train"), (3, "train"), (4, "train")]
    assert "not valid JSON" in rejects[0].reason and "does not exist" in rejects[1].reason
    assert rejects[2].reason.startswith("duplicate id 'r1'")
    assert sum(map(len, splits.values())) + len(rejects) == 5  # every input line accounted for


def pixels(path):
    import numpy as np

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_same_samples(a, b):
    assert a.keys() == b.keys()
    for split in a:
        assert [s.id for s in a[split]] == [s.id for s in b[split]], split
        for x, y in zip(a[split], b[split], strict=True):
            assert (x.instruction, x.answer, x.metadata, x.expert, x.split) == (
                y.instruction,
                y.answer,
                y.metadata,
                y.expert,
                y.split,
            )
            assert len(x.images) == len(y.images)
            for p, q in zip(x.images, y.images, strict=True):
                assert (pixels(p) == pixels(q)).all()


@pytest.fixture(scope="module")
def messages_ds(synth_data):
    return synth_data / "calendar"


@pytest.fixture(autouse=True)
def _image_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("via", ["sharegpt", "hf"])
def test_round_trip_through_sharegpt_and_hf_keeps_every_sample(messages_ds, tmp_path, via):
    from mole_trainer.data.convert import convert_dataset
    from mole_trainer.data.formats import is_hf_dataset

    original = load_expert_dataset(messages_ds)
    convert_dataset(messages_ds, tmp_path / via, to=via, strict=True)
    assert is_hf_dataset(tmp_path / via) == (via == "hf")
    assert_same_samples(original, load_expert_dataset(tmp_path / via))
    back = convert_dataset(tmp_path / via, tmp_path / "back", to="messages", strict=True)
    assert back["records"] == {"input": 22, "accepted": 22, "rejected": 0}
    assert_same_samples(original, load_expert_dataset(tmp_path / "back"))
    if via == "hf":  # the images came back from embedded bytes, not from the original files
        (s,) = load_expert_dataset(tmp_path / "back")["train"][:1]
        assert not s.images[0].is_relative_to(messages_ds.resolve())


def hf_rows(ds_root, n=2, **extra):
    return {
        "id": [f"h{i}" for i in range(n)],
        "image": [str(ds_root / "images/a.png")] * n,
        "conversations": [
            [{"from": "human", "value": "<image>Click"}, {"from": "gpt", "value": f"click({i})"}]
            for i in range(n)
        ],
        **extra,
    }


def test_single_hf_dataset_with_path_column_and_split_column(ds):
    from datasets import Dataset

    rows = hf_rows(ds, 3, split=["train", "test", "train"])
    rows["image"] = ["images/a.png"] * 3  # a path column, relative to the dataset folder
    Dataset.from_dict(rows).save_to_disk(str(ds / "hf"))
    (ds / "hf/images").mkdir()
    Image.new("RGB", (8, 8), "green").save(ds / "hf/images/a.png")
    splits = load_expert_dataset(ds / "hf")
    assert [s.id for s in splits["train"]] == ["h0", "h2"] and [s.id for s in splits["test"]] == ["h1"]
    assert splits["train"][0].images == [(ds / "hf/images/a.png").resolve()]


def test_image_symlinked_outside_the_root_is_rejected_in_every_format(ds, tmp_path_factory):
    from datasets import Dataset

    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (ds / "images/link.png").symlink_to(outside)
    write_lines(ds / "train.jsonl", [record(image="images/link.png")])
    with pytest.raises(UserError, match="train.jsonl:1 .*resolves outside the dataset root"):
        load_expert_dataset(ds)
    sharegpt = {"id": "s", "image": "images/link.png", "conversations": hf_rows(ds, 1)["conversations"][0]}
    write_lines(ds / "train.jsonl", [sharegpt])
    with pytest.raises(UserError, match="resolves outside the dataset root"):
        load_expert_dataset(ds)
    hf = ds / "hf"
    hf.mkdir()
    (hf / "images").mkdir()
    (hf / "images/link.png").symlink_to(outside)
    rows = hf_rows(ds, 1)
    rows["image"] = ["images/link.png"]
    Dataset.from_dict(rows).save_to_disk(str(hf))
    with pytest.raises(UserError, match=r"\[dataset\] row 1 \(id h0\): image\[0\]: .*resolves outside"):
        load_expert_dataset(hf)
