"""Encoding with the genuine Qwen3-VL-8B-Instruct processor (vendored in tests/fixtures), no model needed.

The tiny tokenizer has no merge for "\\n\\n" (its corpus has no newlines), so the prompt/answer
boundary cases only show with the real vocabulary.
"""

import json
import re
from pathlib import Path

import pytest

from mole_trainer.data.preprocess import IGNORE_INDEX, encode_prompt, encode_sample, load_images
from mole_trainer.data.records import Sample
from mole_trainer.errors import UserError
from mole_trainer.model.lora import target_regex
from mole_trainer.model.tiny import load_given_processor, processor_vocab_size

PROCESSOR = Path(__file__).parents[1] / "fixtures" / "qwen3-vl-8b-processor"


@pytest.fixture(scope="module")
def processor():
    return load_given_processor(PROCESSOR)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(path)
    return path


def sample(image: Path, answer: str) -> Sample:
    return Sample(id="r1", images=[image], instruction="Read the note.", answer=answer, source="t.jsonl:1")


@pytest.mark.parametrize("answer", ["plain", "  indented", "two lines\nof text\n", "Total: 12.50"])
def test_answer_tokens_follow_the_generation_prompt_tokens(processor, image, answer):
    s = sample(image, answer)
    ex = encode_sample(processor, s, "sft")
    images = load_images(s)
    gen = encode_prompt(processor, s.messages(with_answer=False), images)["input_ids"][0].tolist()
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    # training continues from exactly the tokens generation starts from
    assert ids[: len(gen)] == gen
    assert labels == [IGNORE_INDEX] * len(gen) + ids[len(gen) :]
    tok = processor.tokenizer
    assert ids[len(gen) :] == tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("answer", ["\nTotal: 12.50", "\n\n- milk\n- eggs"])
def test_an_answer_that_merges_with_the_assistant_header_is_rejected(processor, image, answer):
    """The real BPE has "\n\n": the header's newline and the answer's merge, leaving no mask boundary.

    (The tiny tokenizer's corpus has no newlines, so it never shows this.)
    """
    s = sample(image, answer)
    joined = tokens(processor, processor.apply_chat_template(s.messages(), tokenize=False))
    header = tokens(
        processor,
        processor.apply_chat_template(s.messages(False), tokenize=False, add_generation_prompt=True),
    )
    assert joined[: len(header)] != header  # the merge is real in this vocabulary
    with pytest.raises(
        UserError, match=r"^t.jsonl:1: cannot encode this record \(an assistant turn does not"
    ):
        encode_sample(processor, s, "sft")


def tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text)["input_ids"]


def test_a_processor_folder_that_disagrees_with_itself_is_refused(processor, tmp_path):
    real = json.loads((PROCESSOR / "config.json").read_text())
    assert processor_vocab_size(PROCESSOR, processor) == 151936
    assert processor_vocab_size(tmp_path, processor) == 151680  # no config: tokenizer, padded to 64
    small = {**real, "text_config": {**real["text_config"], "vocab_size": 151000}}
    (tmp_path / "config.json").write_text(json.dumps(small))
    with pytest.raises(UserError, match=r"config.json: vocab_size 151000 is smaller than .* 151669 tokens"):
        processor_vocab_size(tmp_path, processor)
    (tmp_path / "config.json").write_text(json.dumps({**real, "image_token_id": 151654}))
    with pytest.raises(
        UserError, match=r"config.json: image_token_id is 151654 but the tokenizer gives 151655"
    ):
        processor_vocab_size(tmp_path, processor)


def test_not_a_processor_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"--processor .*missing: not a folder"):
        load_given_processor(tmp_path / "missing")
    with pytest.raises(UserError, match=r"--processor .*: cannot load a processor there"):
        load_given_processor(tmp_path)


def test_lora_targets_hit_exactly_the_real_language_model_projections():
    """PEFT full-matches a string target against module names: check it on the real checkpoint's names."""
    weights = json.loads((PROCESSOR / "model.safetensors.index.json").read_text())["weight_map"]
    modules = {name.rsplit(".", 1)[0] for name in weights}
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hit = {m for m in modules if re.fullmatch(target_regex(projections), m)}
    assert len(hit) == 36 * 7  # Qwen3-VL-8B: 36 text layers
    assert not any(".visual." in m for m in hit)
    one = {m for m in modules if re.fullmatch(target_regex(["o_proj"]), m)}
    assert one == {f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(36)}


def test_tiny_model_has_the_real_checkpoints_parameter_names(tiny_model):
    """Every weight of the tiny model is named as in the real checkpoint (adapters and tools carry over)."""
    from safetensors import safe_open

    def shapes(names):
        return {re.sub(r"\.\d+\.", ".N.", n) for n in names}

    real = shapes(json.loads((PROCESSOR / "model.safetensors.index.json").read_text())["weight_map"])
    with safe_open(tiny_model / "model.safetensors", "pt") as f:
        tiny = shapes(f.keys())
    assert tiny == real - {"lm_head.weight"}  # the tiny model ties its head to the embedding
