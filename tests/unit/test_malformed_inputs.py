"""Malformed inputs, one per case: each gives a message naming the file, the line (or row / field)
and what was expected, or a rejects entry that says the same; the CLI exits 2 (strict) or lists
the record in rejects.jsonl (lenient) and the counts reconcile (input = accepted + rejected).

Record-level cases run three ways: strict read (error), lenient read (one reject, the good record
kept) and `mole data convert` (exit 2 with --strict; exit 0 and a rejects file without).
"""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
from PIL import Image

from mole_trainer.cli import main
from mole_trainer.data.formats import read_dataset
from mole_trainer.data.records import RecordError
from mole_trainer.errors import UserError

GOOD_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Click on the 3rd"}]},
    {"role": "assistant", "content": "click(x=1, y=2)"},
]


def rec(rid="r2", images=("images/a.png",), messages=None, **extra):
    return {
        "id": rid,
        "images": list(images),
        "messages": GOOD_TURNS if messages is None else messages,
        **extra,
    }


def sharegpt(value="<image>Click", images=("images/a.png",), answer_from="gpt", **extra):
    return {
        "id": "s2",
        "conversations": [{"from": "human", "value": value}, {"from": answer_from, "value": "ok"}],
        "images": list(images),
        **extra,
    }


def png_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _truncated(root):
    data = png_bytes()
    (root / "images/t.png").write_bytes(data[: len(data) // 2])
    return rec(images=["images/t.png"])


def _zero_bytes(root):
    (root / "images/z.png").write_bytes(b"")
    return rec(images=["images/z.png"])


def _not_an_image(root):
    (root / "images/notes.png").write_text("these are my notes, not a picture")
    return rec(images=["images/notes.png"])


def _symlink_out(root):
    outside = root.parent / "outside.png"
    outside.write_bytes(png_bytes())
    (root / "images/link.png").symlink_to(outside)
    return rec(images=["images/link.png"])


def _absolute(root):
    outside = root.parent / "abs.png"
    outside.write_bytes(png_bytes())
    return rec(images=[str(outside)])


# (case name, bad line (object, raw string, or a function of the dataset root), expected fragment)
RECORD_CASES = [
    ("truncated image", _truncated, "cannot be decoded"),
    ("zero-byte image", _zero_bytes, "cannot be decoded"),
    ("text file with an image extension", _not_an_image, "cannot be decoded"),
    ("missing image", rec(images=["images/gone.png"]), "image 'images/gone.png' does not exist"),
    ("path escaping the root", rec(images=["../a.png"]), "images[0]: image path '../a.png' resolves outside"),
    ("symlink escaping the root", _symlink_out, "resolves outside the dataset root"),
    ("absolute path outside the root", _absolute, "resolves outside the dataset root"),
    ("bad JSON line", '{"id": "r2", "images": [', "not valid JSON"),
    ("JSON line that is not an object", "[1, 2]", "expected a JSON object, got list"),
    ("invalid UTF-8", b'{"id": "r2\xff"}', "not valid UTF-8"),
    ("id of the wrong type", rec(rid=7), "field 'id' must be a non-empty string"),
    ("images as a string", {**rec(), "images": "images/a.png"}, "field 'images' must be a non-empty list"),
    ("metadata as a list", rec(metadata=[1]), "field 'metadata' must be an object"),
    ("empty conversation", rec(messages=[]), "field 'messages' must be a non-empty list of turns"),
    (
        "no assistant answer",
        rec(messages=[GOOD_TURNS[0], {"role": "user", "content": "and?"}]),
        "the last message must be the assistant answer, got role 'user'",
    ),
    (
        "empty assistant answer",
        rec(messages=[GOOD_TURNS[0], {"role": "assistant", "content": " "}]),
        "the assistant answer is empty",
    ),
    ("duplicate id", rec(rid="r1"), "duplicate id 'r1' (first at line 1)"),
    (
        "image parts do not match the images",
        rec(images=["images/a.png", "images/a.png"]),
        "messages[0].content has 1 image part(s) but 'images' lists 2 image(s)",
    ),
    (
        "unknown content part",
        rec(messages=[{"role": "user", "content": [{"type": "video"}]}, GOOD_TURNS[1]]),
        "content[0].type 'video' is not 'image' or 'text'",
    ),
    ("split outside train/val/test", rec(split="dev"), "field 'split' must be one of train, val, test"),
    (
        "ShareGPT placeholders do not match the images",
        sharegpt(value="<image><image>Compare"),
        "conversations[0].value has 2 <image> placeholder(s) but 'images' lists 1 image(s)",
    ),
    (
        "ShareGPT unknown role",
        sharegpt(answer_from="bot"),
        "conversations[1].from 'bot' is not a known role (one of system, human, user, gpt, assistant)",
    ),
    # conversations: system prompts, several turns, images in any user turn
    (
        "assistant first",
        rec(messages=[{"role": "assistant", "content": "Hello"}, *GOOD_TURNS]),
        "messages[0].role must be 'user' (after an optional system prompt, turns alternate user and "
        "assistant, starting with the user), got 'assistant'",
    ),
    (
        "two user turns in a row",
        rec(messages=[GOOD_TURNS[0], {"role": "user", "content": "and?"}, GOOD_TURNS[1]]),
        "messages[1].role must be 'assistant'",
    ),
    (
        "placeholder count off in a later turn",
        {
            "id": "s2",
            "conversations": [
                {"from": "human", "value": "<image>Click"},
                {"from": "gpt", "value": "ok"},
                {"from": "human", "value": "And here?<image>"},
                {"from": "gpt", "value": "ok"},
            ],
            "images": ["images/a.png"],
        },
        "the user turns have 2 image(s) (conversations[0].value: 1 <image> placeholder(s), "
        "conversations[2].value: 1 <image> placeholder(s)) but 'images' lists 1 image(s)",
    ),
    (
        "empty system prompt",
        rec(messages=[{"role": "system", "content": " "}, *GOOD_TURNS]),
        "messages[0].content: the system prompt is empty",
    ),
    ("empty ShareGPT system field", sharegpt(system=""), "field 'system': the system prompt is empty"),
    (
        "unknown role",
        rec(messages=[GOOD_TURNS[0], {"role": "bot", "content": "ok"}]),
        "messages[1].role 'bot' is not a known role (one of system, user, assistant)",
    ),
    (
        "system turn after the first",
        rec(messages=[GOOD_TURNS[0], {"role": "system", "content": "Be brief."}, GOOD_TURNS[1]]),
        "messages[1].role: a system turn may only come first",
    ),
    (
        "ShareGPT system given as a field and as a turn",
        {
            **sharegpt(system="Be brief."),
            "conversations": [{"from": "system", "value": "Be brief."}, *sharegpt()["conversations"]],
        },
        "give the system prompt either in field 'system' or as a first system turn, not both",
    ),
    (
        "empty earlier assistant turn",
        rec(messages=[*GOOD_TURNS[:1], {"role": "assistant", "content": ""}, *GOOD_TURNS]),
        "messages[1].content: the assistant turn is empty",
    ),
    (
        "image in an assistant turn",
        rec(messages=[GOOD_TURNS[0], {"role": "assistant", "content": [{"type": "image"}]}]),
        "messages[1].content: content[0].type 'image': an assistant turn holds text only",
    ),
    (
        "ShareGPT with both image and images",
        sharegpt(image="images/a.png"),
        "give either 'image' or 'images', not both",
    ),
]


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images/a.png").write_bytes(png_bytes())
    return root


def write_train(root, bad):
    bad = bad(root) if callable(bad) else bad
    if isinstance(bad, dict):
        bad = json.dumps(bad)
    if isinstance(bad, str):
        bad = bad.encode()
    (root / "train.jsonl").write_bytes(json.dumps(rec(rid="r1")).encode() + b"\n" + bad + b"\n")


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("bad", "fragment"), [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES])
def test_bad_record_strict_error_and_lenient_reject(ds, bad, fragment):
    write_train(ds, bad)
    with pytest.raises(RecordError) as err:
        read_dataset(ds)
    assert f"{ds / 'train.jsonl'}:2" in str(err.value) and fragment in str(err.value)
    splits, rejects = read_dataset(ds, strict=False)
    assert [s.id for s in splits["train"]] == ["r1"]
    (r,) = rejects
    assert (r.file, r.line, r.split) == (str(ds / "train.jsonl"), 2, "train") and fragment in r.reason


@pytest.mark.parametrize(
    "case", ["truncated image", "path escaping the root", "bad JSON line", "ShareGPT unknown role"]
)
def test_cli_convert_exits_2_when_strict_and_lists_rejects_otherwise(ds, tmp_path, case):
    _, bad, fragment = next(c for c in RECORD_CASES if c[0] == case)
    write_train(ds, bad)
    code, _, err = run_cli(
        "--workdir",
        str(tmp_path),
        "data",
        "convert",
        "--input",
        str(ds),
        "--output",
        str(tmp_path / "strict"),
        "--strict",
    )
    assert code == 2 and err.startswith("error: ") and "train.jsonl:2" in err and fragment in err
    assert "Traceback" not in err
    code, out, err = run_cli(
        "--workdir",
        str(tmp_path),
        "data",
        "convert",
        "--input",
        str(ds),
        "--output",
        str(tmp_path / "lenient"),
    )
    assert code == 0 and "2 records: 1 accepted, 1 rejected" in err
    assert json.loads(out)["records"] == {"input": 2, "accepted": 1, "rejected": 1}
    (entry,) = [json.loads(x) for x in (tmp_path / "lenient/rejects.jsonl").read_text().splitlines()]
    assert entry["line"] == 2 and fragment in entry["reason"]


def test_empty_dataset(ds, tmp_path):
    (ds / "train.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        read_dataset(ds, strict=False)
    code, _, err = run_cli(
        "--workdir", str(tmp_path), "data", "convert", "--input", str(ds), "--output", str(tmp_path / "o")
    )
    assert code == 2 and f"{ds}: no records" in err


def _hf(root, rows):
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_dict(r) for name, r in rows.items()}).save_to_disk(str(root))


def test_hf_dataset_missing_columns(tmp_path):
    _hf(tmp_path / "hf", {"train": {"question": ["q"], "answer": ["a"]}})
    with pytest.raises(
        UserError, match=r"hf \[train\]: columns \['answer', 'question'\] do not form expert records"
    ):
        read_dataset(tmp_path / "hf", strict=False)


def test_hf_dataset_unknown_split(tmp_path):
    _hf(tmp_path / "hf", {"dev": {"messages": [[]], "images": [[]]}})
    with pytest.raises(UserError, match="split 'dev' is not one of train, val"):
        read_dataset(tmp_path / "hf")


def test_hf_embedded_bytes_that_are_not_an_image(tmp_path, monkeypatch):
    from datasets import Features, Image, List, Value

    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path / "cache"))
    rows = {
        "id": ["ok", "bad"],
        "images": [[{"bytes": png_bytes(), "path": "a.png"}], [{"bytes": b"GIF89a? no", "path": "b.gif"}]],
        "conversations": [[{"from": "human", "value": "<image>Read"}, {"from": "gpt", "value": "x"}]] * 2,
    }
    from datasets import Dataset

    features = Features(
        {
            "id": Value("string"),
            "images": List(Image()),
            "conversations": List({"from": Value("string"), "value": Value("string")}),
        }
    )
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    splits, rejects = read_dataset(tmp_path / "hf", strict=False)
    assert [s.id for s in splits["train"]] == ["ok"]
    (r,) = rejects
    assert (r.id, r.line, r.file) == (
        "bad",
        2,
        f"{tmp_path / 'hf'} [dataset]",
    ) and "cannot be decoded" in r.reason


def routing_file(tmp_path, experts=("calendar", "ocr"), split="train"):
    root = tmp_path / "routing"
    (root / "images").mkdir(parents=True)
    (root / "images/a.png").write_bytes(png_bytes())
    lines = [rec(rid=f"x{i}", expert=e, split=split) for i, e in enumerate(experts)]
    (root / "routing.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "routing.jsonl"


def prep_args(tmp_path, path, *extra):
    return (
        "--workdir",
        str(tmp_path),
        "data",
        "preprocess",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "prep"),
        "--model",
        str(tmp_path / "no-model"),
        *extra,
    )


def test_unknown_expert_for_the_label_map(tmp_path):
    path = routing_file(tmp_path, experts=("calendar", "weather"))
    (path.parent / "label_map.json").write_text(json.dumps({"calendar": 0, "ocr": 1}))
    code, _, err = run_cli(*prep_args(tmp_path, path, "--task", "router"))
    assert (
        code == 2
        and "routing.jsonl:2" in err
        and "expert 'weather' is not in the label map (calendar, ocr)" in err
    )


def test_label_map_that_is_not_0_to_k_minus_1(tmp_path):
    path = routing_file(tmp_path)
    (path.parent / "label_map.json").write_text(json.dumps({"calendar": 0, "ocr": 2}))
    code, _, err = run_cli(*prep_args(tmp_path, path, "--task", "router"))
    assert (
        code == 2
        and "label_map.json: a label map must map each expert name to a distinct index 0..K-1" in err
    )


def test_routing_record_without_a_split_is_rejected_or_fails_strict(tmp_path):
    path = routing_file(tmp_path, split=None)
    code, _, err = run_cli(*prep_args(tmp_path, path, "--task", "router", "--strict"))
    assert code == 2 and "routing.jsonl:1 (id x0): a JSONL input needs a 'split' field" in err


def test_config_typo_names_the_key(tmp_path, ds):
    (tmp_path / "router.yaml").write_text("base_model: m\nimgae: {min_pixels: 10}\n")
    code, _, err = run_cli(
        *prep_args(tmp_path, ds, "--config", str(tmp_path / "router.yaml"), "--task", "router")
    )
    assert code == 2 and "router.yaml" in err and "imgae" in err and "image" in err


def test_workers_must_be_positive(tmp_path, ds):
    code, _, err = run_cli(*prep_args(tmp_path, ds, "--workers", "0"))
    assert code == 2 and "--workers: expected a number >= 1, got 0" in err


# --- LLaMA-Factory folders (dataset_info.json) ---------------------------------------------------------


def test_dataset_info_entry_pointing_at_a_missing_file(ds, tmp_path):
    info = {"screens": {"file_name": "screens.json", "formatting": "sharegpt"}}
    (ds / "dataset_info.json").write_text(json.dumps(info))
    (ds / "train.jsonl").unlink(missing_ok=True)
    for strict in (True, False):  # the dataset itself is missing: an error either way
        with pytest.raises(UserError) as err:
            read_dataset(f"{ds}#screens", strict=strict)
        assert str(err.value) == (
            f"{ds / 'dataset_info.json'}: dataset 'screens': file_name 'screens.json' not found "
            f"({ds / 'screens.json'})"
        )
    code, _, err = run_cli(
        "--workdir",
        str(tmp_path),
        "data",
        "convert",
        "--input",
        f"{ds}#screens",
        "--output",
        str(tmp_path / "o"),
    )
    assert code == 2 and "file_name 'screens.json' not found" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("info", "array", "fragment"),
    [
        (
            {"d": {"file_name": "d.json", "formatting": "ranking"}},
            "[]",
            "formatting 'ranking' is not 'sharegpt'",
        ),
        ({"d": {"hf_hub_url": "org/x"}}, "[]", "dataset 'd': 'hf_hub_url' datasets are not read"),
        (
            {"d": {"file_name": "d.json", "formatting": "sharegpt", "num_samples": 5}},
            "[]",
            "dataset 'd': 'num_samples' is not supported",
        ),
        (
            {"d": {"file_name": "d.json", "formatting": "sharegpt", "tags": {"speaker_tag": "who"}}},
            "[]",
            "dataset 'd': tags.speaker_tag is not one of role_tag",
        ),
        (
            {"d": {"file_name": "d.json", "formatting": "sharegpt"}},
            '[\n  {"a": 1},\n  {"a": }\n]',
            "d.json:3: not valid JSON",
        ),
        (
            {"d": {"file_name": "d.json", "formatting": "sharegpt"}},
            '{"a": 1}',
            "d.json: expected a JSON array",
        ),
    ],
    ids=[
        "unknown formatting",
        "hub entry",
        "num_samples",
        "unknown tag",
        "bad JSON in the array",
        "not an array",
    ],
)
def test_bad_dataset_info_entries_and_files(ds, info, array, fragment):
    (ds / "dataset_info.json").write_text(json.dumps(info))
    (ds / "d.json").write_text(array)
    with pytest.raises(UserError) as err:
        read_dataset(f"{ds}#d", strict=False)
    assert fragment in str(err.value)
