"""The pipeline on a tiny model built around the genuine Qwen3-VL-8B-Instruct processor.

The CLI runs data routing -> preprocess -> train router -> eval -> train experts -> deploy -> infer on
a tiny network that has the real tokenizer, vocabulary (151,936), chat template and special-token
ids. The training inputs and label masks the stages wrote are then compared token by token with the
real template's rendering of the same conversations, tokenised by the real tokenizer.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mole_trainer.cli import main
from mole_trainer.configs import write_configs

pytestmark = pytest.mark.slow

PROCESSOR = Path(__file__).parents[1] / "fixtures" / "qwen3-vl-8b-processor"
EXPERTS = ["calendar", "ocr"]
TRAIN = {"lr": 0.003, "steps": 2, "batch_size": 2, "eval_every": 2, "warmup_ratio": 0.0, "patience": 0}
SMALL = {"image": {"min_pixels": 4096, "max_pixels": 20000}, "lora": {"rank": 4, "alpha": 8}, "train": TRAIN}
OVERRIDES = {
    "dataset.yaml": {"train_per_expert": 4, "val_per_expert": 2, "test_per_expert": 2},
    "loras.yaml": {**SMALL, "eval_records": 1},
    "router.yaml": {**SMALL, "eval_max_records": 4},
}
IGNORE = -100
# a multi-turn expert record: system prompt, two rounds, the image inside the second user turn's text
MULTI_TURN = {
    "id": "calendar-multi-turn",
    "messages": [
        {"role": "system", "content": "You operate a calendar app. Answer with one action."},
        {"role": "user", "content": [{"type": "text", "text": "I need to pick a date next month."}]},
        {"role": "assistant", "content": "Show me the calendar first."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here it is: "},
                {"type": "image"},
                {"type": "text", "text": " Click on the 14th."},
            ],
        },
        {"role": "assistant", "content": "click(x=120, y=88)"},
    ],
}


def mole(wd: Path, *args: str) -> None:
    assert main(["--workdir", str(wd), *args]) == 0


def write_two_expert_configs(config_dir: Path) -> None:
    """The demo's configs at test sizes, with only EXPERTS in the routing dataset and the LoRAs."""
    write_configs(config_dir, OVERRIDES, every_expert={"loras.yaml": {"max_new_tokens": 4}})
    for name in ("dataset.yaml", "loras.yaml"):
        data = yaml.safe_load((config_dir / name).read_text())
        data["experts"] = {e: v for e, v in data["experts"].items() if e in EXPERTS}
        (config_dir / name).write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    w = tmp_path_factory.mktemp("realproc")
    write_two_expert_configs(w / "config")
    mole(w, "model", "tiny", "--out", str(w / "model/tiny-qwen3-vl"), "--processor", str(PROCESSOR))
    synth = ["--train", "4", "--val", "2", "--test", "2", "--size", "320x240"]
    mole(w, "data", "synth", "--out", str(w / "data/experts"), "--experts", ",".join(EXPERTS), *synth)
    calendar = w / "data/experts/calendar"
    first = json.loads((calendar / "train.jsonl").read_text().splitlines()[0])
    record = {**MULTI_TURN, "images": first["images"]}  # a train record's screenshot: no split leak
    with (calendar / "train.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    routing = w / "data/routing/routing_data.jsonl"
    mole(w, "data", "routing", "--config", str(w / "config/dataset.yaml"), "--output", str(routing))
    router_yaml = str(w / "config/router.yaml")
    mole(
        w,
        "data",
        "preprocess",
        "--input",
        str(routing),
        "--output",
        str(w / "prep/router"),
        "--config",
        router_yaml,
    )
    mole(w, "train", "router", "--dataset-path", str(w / "prep/router"), "--config", router_yaml)
    report = w / "eval/report.json"
    ckpt = str(w / "checkpoints/router")
    mole(w, "eval", "router", "--checkpoint", ckpt, "--test-data", str(routing), "--output", str(report))
    mole(w, "train", "experts", "--config", str(w / "config/loras.yaml"), "--device", "cpu")
    experts = str(w / "checkpoints/experts")
    mole(w, "deploy", "--checkpoint", ckpt, "--experts", experts, "--bucket", str(w / "deploy"))
    return w


@pytest.fixture(scope="module")
def processor(wd):
    from mole_trainer.model.loading import load_processor

    return load_processor(str(wd / "model/tiny-qwen3-vl"), 4096, 20000)


def rendered(processor, messages: list[dict], images, generation_prompt: bool = False) -> dict:
    """The real template's rendering of `messages`, through the real processor (image pads expanded)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return processor(text=[text], images=images or None, return_tensors="pt")


def n_images(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "image"
    )


def check_against_template(processor, example: dict, messages: list[dict], images) -> list[list[int]]:
    """Assert the training example is the template's rendering, supervised exactly on the assistant turns.

    The reference is built from token renderings of growing prefixes of the conversation (not from
    character spans, as preprocessing finds them). Returns each assistant turn's supervised ids.
    """
    whole = rendered(processor, messages, images)
    ref = whole["input_ids"][0].tolist()
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    # the training row is the rendered conversation up to and including the final <|im_end|>;
    # all the template adds after it is the newline between turns
    assert ids == ref[: len(ids)]
    assert processor.tokenizer.decode(ref[len(ids) :]) == "\n"
    assert example["attention_mask"].tolist() == whole["attention_mask"][0].tolist()[: len(ids)]
    assert example["mm_token_type_ids"].tolist() == whole["mm_token_type_ids"][0].tolist()[: len(ids)]
    if images:
        assert torch.equal(example["pixel_values"], whole["pixel_values"])
        assert torch.equal(example["image_grid_thw"], whole["image_grid_thw"])
    expected, turns = [IGNORE] * len(ids), []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        seen = images[: n_images(messages[:k])]
        head = rendered(processor, messages[:k], seen, generation_prompt=True)["input_ids"][0].tolist()
        upto = rendered(processor, messages[: k + 1], seen)["input_ids"][0].tolist()
        assert upto[: len(head)] == head and ref[: len(upto)] == upto
        assert upto[-2] == 151645 and processor.tokenizer.decode(upto[-1:]) == "\n"  # <|im_end|> "\n"
        # supervised: the turn's tokens after the generation prompt, through <|im_end|>
        expected[len(head) : len(upto) - 1] = upto[len(head) : -1]
        turns.append(upto[len(head) : -1])
    assert labels == expected
    return turns


def test_model_has_the_real_processor_and_vocabulary(wd, processor):
    model_dir = wd / "model/tiny-qwen3-vl"
    config = json.loads((model_dir / "config.json").read_text())
    real = json.loads((PROCESSOR / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == real["text_config"]["vocab_size"] == 151936
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert config[key] == real[key]
    assert config["vision_config"]["patch_size"] == real["vision_config"]["patch_size"]
    assert config["vision_config"]["spatial_merge_size"] == real["vision_config"]["spatial_merge_size"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    real_generation = json.loads((PROCESSOR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == real_generation["eos_token_id"]
    assert generation["pad_token_id"] == real_generation["pad_token_id"]
    tok = processor.tokenizer
    assert len(tok) == 151669 and tok("Hello, world")["input_ids"] == [9707, 11, 1879]
    template = json.loads((PROCESSOR / "chat_template.json").read_text())["chat_template"]
    assert processor.chat_template == template


def test_router_inputs_and_masks_match_the_real_template(wd, processor):
    from mole_trainer.data.preprocess import load_images, load_preprocessed, sample_from_dict
    from mole_trainer.infer.scoring import label_token_ids
    from mole_trainer.router_prompt import label_names, router_messages

    meta, payload = load_preprocessed(wd / "prep/router", "train")
    names = label_names(meta["label_map"])
    # the train records and a rewritten copy of half of them (the demo's dataset.yaml augments)
    per_expert = OVERRIDES["dataset.yaml"]["train_per_expert"]
    assert names == EXPERTS and len(payload["examples"]) == len(EXPERTS) * (per_expert + per_expert // 2)
    scored = label_token_ids(processor.tokenizer, names)
    for example, record in zip(payload["examples"], payload["samples"], strict=True):
        s = sample_from_dict(record)
        messages = router_messages(s.instruction, len(s.images), names)
        messages.append({"role": "assistant", "content": s.expert})
        (supervised,) = check_against_template(processor, example, messages, load_images(s))
        assert processor.tokenizer.decode(supervised) == s.expert + "<|im_end|>"
        assert supervised == scored[names.index(s.expert)]  # what routing scores is what was trained


def test_expert_inputs_and_masks_match_the_real_template(wd, processor):
    from mole_trainer.data.preprocess import load_images, load_preprocessed, sample_from_dict

    checked = []
    for expert in EXPERTS:
        _, payload = load_preprocessed(wd / f"checkpoints/experts/{expert}/prep", "train")
        assert payload["examples"]
        for example, record in zip(payload["examples"], payload["samples"], strict=True):
            s = sample_from_dict(record)
            turns = check_against_template(processor, example, s.messages(), load_images(s))
            assert processor.tokenizer.decode(turns[-1]) == s.answer + "<|im_end|>"
            checked.append((s.id, turns))
    multi = dict(checked)[MULTI_TURN["id"]]  # the multi-turn record: both assistant turns supervised
    answers = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert [processor.tokenizer.decode(t) for t in multi] == [a + "<|im_end|>" for a in answers]


def test_eval_and_infer_route_with_the_real_vocabulary(wd, capsys):
    report = json.loads((wd / "eval/report.json").read_text())
    assert report["n"] == 2 * OVERRIDES["dataset.yaml"]["test_per_expert"]
    assert sum(map(sum, report["confusion"]["matrix"])) == report["n"]
    image = next((wd / "data/experts/calendar/images").iterdir())
    capsys.readouterr()
    infer = ["infer", "--deployment", str(wd / "deploy"), "--max-new-tokens", "4"]
    mole(wd, *infer, "--image", str(image), "--prompt", "Pick the 5th.")
    expert = capsys.readouterr().out.strip().splitlines()[-1].split("\t")[1]
    assert expert in EXPERTS
    # a request with a system prompt and history, ending with the user turn to answer
    calendar = wd / "data/experts/calendar"
    first = json.loads((calendar / "train.jsonl").read_text().splitlines()[0])
    request = {"id": "with-history", "images": first["images"], "messages": MULTI_TURN["messages"][:-1]}
    (calendar / "requests.jsonl").write_text(json.dumps(request) + "\n")
    out = wd / "out.jsonl"
    mole(wd, *infer, "--input", str(calendar / "requests.jsonl"), "--output", str(out))
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["id"] == "with-history" and result["expert"] in EXPERTS
    assert abs(sum(result["probs"].values()) - 1) < 1e-3
