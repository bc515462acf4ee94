"""Real conversation formats: system prompts, multi-turn records, images in place, LLaMA-Factory
datasets; round trips between the formats; label masks against the chat template's rendering
(the tiny model's template and the genuine Qwen3-VL-8B one)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mole_trainer.data.formats import load_expert_dataset, read_dataset
from mole_trainer.data.records import load_jsonl_samples
from mole_trainer.errors import UserError

SYSTEM = "You are a careful GUI agent."
# a two-round conversation: the first image in the middle of the first request, the second at
# the end of the second request
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Look at"},
            {"type": "image"},
            {"type": "text", "text": "which day is selected?"},
        ],
    },
    {"role": "assistant", "content": "The 14th."},
    {"role": "user", "content": [{"type": "text", "text": "And in this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": "The 3rd."},
]
TURNS = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Look at"},
            {"type": "image"},
            {"type": "text", "text": "which day is selected?"},
        ],
    },
    {"role": "assistant", "content": "The 14th."},
    {"role": "user", "content": [{"type": "text", "text": "And in this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": "The 3rd."},
]


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def ds(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(root / "images/a.png")
    Image.new("RGB", (48, 64), "blue").save(root / "images/b.png")
    single = {
        "id": "one",
        "images": ["images/b.png"],
        "messages": [
            {"role": "user", "content": "<image>\nClick on the 3rd"},
            {"role": "assistant", "content": "click(x=1, y=2)"},
        ],
    }
    multi = {"id": "multi", "images": ["images/a.png", "images/b.png"], "messages": MESSAGES}
    write_lines(root / "train.jsonl", [multi, single])
    write_lines(root / "test.jsonl", [{**multi, "id": "multi-test", "metadata": {"task": "text"}}])
    return root


def test_multi_turn_record_keeps_system_turns_and_image_places(ds):
    multi, single = load_expert_dataset(ds)["train"]
    assert multi.system == SYSTEM and multi.turns == TURNS
    assert multi.images == [(ds / "images/a.png").resolve(), (ds / "images/b.png").resolve()]
    # the router view: the user turns' text, one per line; the final assistant turn is the answer
    assert multi.instruction == "Look at\nwhich day is selected?\nAnd in this one?"
    assert multi.answer == "The 3rd."
    msgs = multi.messages(with_answer=False)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"][1] == {"type": "image"}  # the image where it stood, not moved first
    assert [m["role"] for m in multi.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert (single.system, single.instruction, single.turns[0]["content"][0]) == (
        None,
        "Click on the 3rd",
        {"type": "image"},
    )


def test_sharegpt_system_field_and_system_turn(ds):
    conv = [
        {"from": "human", "value": "Look at\n<image>\nwhich day is selected?"},
        {"from": "gpt", "value": "The 14th."},
        {"from": "human", "value": "And in this one?<image>"},
        {"from": "gpt", "value": "The 3rd."},
    ]
    images = ["images/a.png", "images/b.png"]
    by_field = {"id": "f", "system": SYSTEM, "conversations": conv, "images": images}
    by_turn = {"id": "t", "conversations": [{"from": "system", "value": SYSTEM}, *conv], "images": images}
    write_lines(ds / "train.jsonl", [by_field, by_turn])
    for s in load_expert_dataset(ds)["train"]:
        assert (s.system, s.turns, s.answer) == (SYSTEM, TURNS, "The 3rd.")


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_same_conversations(a, b):
    assert a.keys() == b.keys()
    for split in a:
        assert [s.id for s in a[split]] == [s.id for s in b[split]], split
        for x, y in zip(a[split], b[split], strict=True):
            assert (x.system, x.turns, x.instruction, x.answer, x.metadata) == (
                y.system,
                y.turns,
                y.instruction,
                y.answer,
                y.metadata,
            )
            assert len(x.images) == len(y.images)
            for p, q in zip(x.images, y.images, strict=True):  # the same image at the same place
                assert (pixels(p) == pixels(q)).all()


@pytest.mark.parametrize("via", ["sharegpt", "hf"])
def test_round_trips_keep_system_turns_and_image_positions(ds, tmp_path, via):
    from mole_trainer.data.convert import convert_dataset

    original = load_expert_dataset(ds)
    convert_dataset(ds, tmp_path / via, to=via, strict=True)
    assert_same_conversations(original, load_expert_dataset(tmp_path / via))
    convert_dataset(tmp_path / via, tmp_path / "back", to="messages", strict=True)
    assert_same_conversations(original, load_expert_dataset(tmp_path / "back"))
    if via == "sharegpt":
        line = json.loads((tmp_path / via / "train.jsonl").read_text().splitlines()[0])
        assert line["system"] == SYSTEM
        assert [t["value"] for t in line["conversations"]][::2] == [
            "Look at\n<image>\nwhich day is selected?",
            "And in this one?\n<image>",
        ]


# --- LLaMA-Factory -------------------------------------------------------------------------------------


def llamafactory(ds):
    """A LLaMA-Factory folder beside `ds` (its images): a sharegpt entry with role/content tags and
    a system column (like its mllm_demo), one with the default tags, an alpaca entry; JSON arrays."""
    root = ds.parent / "lf"
    (root / "images").mkdir(parents=True)
    for img in ("a", "b"):
        (root / f"images/{img}.png").write_bytes((ds / f"images/{img}.png").read_bytes())
    mllm = [
        {
            "messages": [
                {"role": "user", "content": "Look at\n<image>\nwhich day is selected?"},
                {"role": "assistant", "content": "The 14th."},
                {"role": "user", "content": "And in this one?<image>"},
                {"role": "assistant", "content": "The 3rd."},
            ],
            "images": ["images/a.png", "images/b.png"],
            "sys": SYSTEM,
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Click on the 3rd"},
                {"role": "assistant", "content": "click(x=1, y=2)"},
            ],
            "images": ["images/b.png"],
            "split": "test",
        },
    ]
    (root / "mllm.json").write_text(json.dumps(mllm, indent=2))
    held_out = [
        {
            "conversations": [
                {"from": "human", "value": "<image>Read it"},
                {"from": "gpt", "value": "hello"},
            ],
            "images": ["images/a.png"],
        }
    ]
    (root / "held_out.json").write_text(json.dumps(held_out, indent=2))
    alpaca = [
        {
            "instruction": "<image>What is selected?",
            "input": "Answer briefly.",
            "output": "The 3rd.",
            "history": [["<image>Which app is this?", "A calendar."]],
            "system": SYSTEM,
            "images": ["images/a.png", "images/b.png"],
        }
    ]
    (root / "alpaca.json").write_text(json.dumps(alpaca, indent=2))
    info = {
        "mllm": {
            "file_name": "mllm.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images", "system": "sys"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        },
        "held_out": {"file_name": "held_out.json", "formatting": "sharegpt"},
        "alpaca": {"file_name": "alpaca.json", "columns": {"history": "history"}},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


def test_llamafactory_datasets_are_read_by_name(ds):
    root = llamafactory(ds)
    splits = load_expert_dataset(f"{root}#mllm")
    (multi,) = splits["train"]
    (single,) = splits["test"]  # the record's own split field
    # each record is named by the line its object starts on in the pretty-printed array
    starts = [n for n, line in enumerate((root / "mllm.json").read_text().splitlines(), 1) if line == "  {"]
    assert [multi.source, single.source] == [f"{root / 'mllm.json'}:{n}" for n in starts]
    assert (multi.id, multi.system, multi.turns) == ("mllm-1", SYSTEM, TURNS)
    assert (single.id, single.answer) == ("mllm-2", "click(x=1, y=2)")
    # names give the splits
    splits = load_expert_dataset(f"{root}#mllm,val=held_out")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 0]
    assert splits["val"][0].instruction == "Read it"
    (a,) = load_expert_dataset(f"{root}#alpaca")["train"]
    assert a.system == SYSTEM and [t["role"] for t in a.turns] == ["user", "assistant"] * 2
    assert a.turns[2]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What is selected?\nAnswer briefly."},
    ]
    assert a.instruction == "Which app is this?\nWhat is selected?\nAnswer briefly."
    with pytest.raises(UserError, match=r"lists 3 datasets \(mllm, held_out, alpaca\); name one as .*#NAME"):
        load_expert_dataset(root)
    with pytest.raises(UserError, match="no dataset 'nope'"):
        load_expert_dataset(f"{root}#nope")


def test_llamafactory_json_converts_to_messages_keeping_everything(ds, tmp_path):
    from mole_trainer.cli import main

    root = llamafactory(ds)
    original = load_expert_dataset(f"{root}#mllm")
    argv = [
        "--workdir",
        str(tmp_path),
        "data",
        "convert",
        "--input",
        f"{root}#mllm",
        "--output",
        str(tmp_path / "msgs"),
    ]
    assert main([*argv, "--strict"]) == 0
    back = load_expert_dataset(tmp_path / "msgs")
    assert_same_conversations(original, back)
    assert back["train"][0].turns == TURNS


def test_bad_record_in_a_json_array_names_its_line_and_is_a_reject_when_lenient(ds):
    root = ds.parent / "lf"
    root.mkdir()
    (root / "images").mkdir()
    (root / "images/a.png").write_bytes((ds / "images/a.png").read_bytes())
    good = {
        "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "ok"}],
        "images": ["images/a.png"],
    }
    bad = {"conversations": [{"from": "gpt", "value": "ok"}], "images": ["images/a.png"]}
    (root / "d.json").write_text("[\n" + json.dumps(good) + ",\n\n" + json.dumps(bad) + "\n]\n")
    (root / "dataset_info.json").write_text(
        json.dumps({"d": {"file_name": "d.json", "formatting": "sharegpt"}})
    )
    with pytest.raises(UserError, match=r"d\.json:4 \(id d-2\): conversations\[0\]\.from must be 'human'"):
        read_dataset(root)  # a single entry is read without naming it
    splits, rejects = read_dataset(f"{root}#d", strict=False)
    assert [s.id for s in splits["train"]] == ["d-1"] and [(r.line, r.id) for r in rejects] == [(4, "d-2")]


# --- label masks against the chat template -------------------------------------------------------------


def real_processor_dir() -> Path | None:
    """The genuine Qwen3-VL-8B processor files: vendored in the repository, else a shared checkout."""
    repo = Path(__file__).resolve().parents[2]
    name = "qwen3-vl-8b-processor"
    for d in [repo / "tests/fixtures" / name, *(p / "shared/fixtures" / name for p in repo.parents)]:
        if (d / "chat_template.json").is_file():
            return d
    return None


@pytest.fixture(scope="module", params=["tiny", "qwen3-vl-8b"])
def processor(request, tiny_model):
    from mole_trainer.model.loading import load_processor

    if request.param == "tiny":
        return load_processor(str(tiny_model), 4096, 20000)
    real = real_processor_dir()
    if real is None:
        pytest.skip("the Qwen3-VL-8B processor files are not available")
    return load_processor(str(real), 4096, 20000)


def test_every_assistant_turn_and_only_them_are_supervised(processor, ds):
    from mole_trainer.data.preprocess import IGNORE_INDEX, encode_sample

    multi = load_expert_dataset(ds)["train"][0]
    ex = encode_sample(processor, multi, "sft")
    ids, labels = ex["input_ids"], ex["labels"]
    # the inputs are the template's own rendering of the whole conversation, up to the last <|im_end|>
    rendered = processor.apply_chat_template(multi.messages(), tokenize=False)
    assert rendered.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    text = rendered[: rendered.rindex("<|im_end|>") + len("<|im_end|>")]
    images = [Image.open(p).convert("RGB") for p in multi.images]
    expected = processor(text=[text], images=images, return_tensors="pt")
    assert ids.tolist() == expected["input_ids"][0].tolist()
    # supervised: exactly the runs of tokens after each "<|im_start|>assistant\n", through its <|im_end|>
    tok = processor.tokenizer
    header = tok("<|im_start|>assistant\n")["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    want = [IGNORE_INDEX] * len(ids)
    seq = ids.tolist()
    for i in range(len(seq)):
        if seq[i - len(header) : i] == header:
            j = seq.index(end, i)
            want[i : j + 1] = seq[i : j + 1]
    assert labels.tolist() == want
    runs = tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
    assert runs == "The 14th.<|im_end|>The 3rd.<|im_end|>"
    assert int((ids == processor.image_token_id).sum()) == int(ex["image_grid_thw"].prod(-1).sum()) // 4


def test_router_example_reads_the_router_view(processor, ds):
    from mole_trainer.data.preprocess import IGNORE_INDEX, encode_sample

    multi = load_expert_dataset(ds)["train"][0]
    multi.expert = "calendar"
    ex = encode_sample(processor, multi, "router", ["calendar", "ocr"])
    text = processor.tokenizer.decode(ex["input_ids"])
    # every user turn, one per line, read in lower case with whitespace collapsed (canonical_request)
    assert "Request: look at which day is selected? and in this one?" in text
    assert SYSTEM not in text and "The 14th." not in text  # no system prompt, no assistant turn
    # all images, in conversation order, before the routing instruction
    assert text.count("<|vision_start|>") == 2 and text.rindex("<|vision_end|>") < text.index("Route the")
    assert processor.tokenizer.decode(ex["labels"][ex["labels"] != IGNORE_INDEX]) == "calendar<|im_end|>"


def test_a_template_that_does_not_render_turn_by_turn_is_refused(tiny_model, ds):
    from mole_trainer.data.preprocess import TemplateError, encode_sample
    from mole_trainer.model.loading import load_processor

    proc = load_processor(str(tiny_model), 4096, 20000)
    # renders the number of messages first: the prompt of an earlier turn is no prefix of the whole
    proc.chat_template = "{{ messages | length }}" + proc.chat_template
    with pytest.raises(TemplateError, match="does not render turn by turn"):
        encode_sample(proc, load_expert_dataset(ds)["train"][0], "sft")


# --- routing records and inference requests ------------------------------------------------------------


def test_routing_records_carry_the_whole_conversation(ds, synth_data, tmp_path):
    """dataset.yaml names a plain folder, a LLaMA-Factory dataset (relative DIR#NAME) and the synthetic
    OCR expert; multi-turn records route with their conversation, deduplicated by the router view."""
    from mole_trainer.stages import data_routing

    llamafactory(ds)  # ds.parent / "lf"
    (ds.parent / "dataset.yaml").write_text(
        "experts:\n  chat: {path: ds}\n  lf: {path: 'lf#alpaca'}\n"
        f"  ocr: {{path: {synth_data / 'ocr'}}}\ntest_per_expert: 1\nval_per_expert: 0\n"
    )
    out = tmp_path / "r/routing.jsonl"
    stats = data_routing(ds.parent / "dataset.yaml", out, workdir=tmp_path)
    # 'multi' and 'multi-test' are one request for the router (same images, same user turns)
    assert stats["duplicates_dropped"]["chat"] == 1 and stats["input_records"]["lf"] == 1
    routed = {s.metadata["source_id"]: s for s in load_jsonl_samples(out)}
    multi = next(s for k, s in routed.items() if k.startswith("multi"))
    assert (multi.system, multi.turns, multi.expert) == (SYSTEM, TURNS, "chat")
    assert [pixels(p).shape for p in multi.images] == [(48, 64, 3), (64, 48, 3)]  # a.png, then b.png
    alpaca = routed["alpaca-1"]
    assert (alpaca.expert, alpaca.system, len(alpaca.turns)) == ("lf", SYSTEM, 4)


def test_preprocessed_cache_keeps_the_conversation_for_generation(tiny_model, ds, tmp_path):
    from mole_trainer.data.preprocess import load_preprocessed, preprocess_splits, sample_from_dict

    splits = load_expert_dataset(ds)
    preprocess_splits(splits, tmp_path / "prep", str(tiny_model), "sft", None, 4096, 20000)
    _, payload = load_preprocessed(tmp_path / "prep", "test")
    (cached,) = [sample_from_dict(d) for d in payload["samples"]]
    (original,) = splits["test"]
    # what generation-based evaluation prompts the expert with: system prompt and history included
    assert cached.messages(with_answer=False) == original.messages(with_answer=False)
    assert [m["role"] for m in cached.messages(with_answer=False)] == ["system", "user", "assistant", "user"]


def test_requests_with_system_history_and_sharegpt_lines(ds):
    from mole_trainer.infer.stacked import requests_from_jsonl

    history = {"id": "h", "images": ["images/a.png", "images/b.png"], "messages": MESSAGES[:4]}
    sharegpt = {
        "system": SYSTEM,
        "conversations": [{"from": "human", "value": "<image>Read it"}],
        "image": "images/a.png",
    }
    write_lines(
        ds / "requests.jsonl",
        [history, sharegpt, {"id": "p", "image": "images/a.png", "prompt": "Hi", "system": SYSTEM}],
    )
    h, s, p = requests_from_jsonl(ds / "requests.jsonl")
    # the model answers the last user turn, with the system prompt and the history before it
    assert h.messages(with_answer=False)[1:] == h.messages()[1:] and len(h.messages()) == 4
    assert h.instruction == "Look at\nwhich day is selected?\nAnd in this one?" and h.answer == ""
    assert (s.id, s.system, s.instruction) == ("line-2", SYSTEM, "Read it")
    assert p.messages(with_answer=False)[0]["role"] == "system"
