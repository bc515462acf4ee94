"""Preprocessing (label masks, collation) and router scoring on the tiny model."""

import pytest
import torch

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import IGNORE_INDEX, collate, encode_sample
from mole_trainer.infer.scoring import encode_router_prompts, label_token_ids, route_probs, score_encoded
from mole_trainer.model.chat import END_OF_TURN
from mole_trainer.model.loading import load_base, load_processor

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]


@pytest.fixture(scope="module")
def processor(tiny_model):
    return load_processor(str(tiny_model), 4096, 20000)


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_base(str(tiny_model), "float32", "cpu")


@pytest.fixture(scope="module")
def samples(synth_data):
    out = []
    for name in NAMES:
        s = load_expert_dataset(synth_data / name)["test"][0]
        s.expert = name
        out.append(s)
    return out


def test_only_the_answer_and_end_of_turn_are_supervised(processor, samples):
    s = samples[0]
    ex = encode_sample(processor, s, "sft")
    supervised = ex["labels"][ex["labels"] != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(supervised) == s.answer + END_OF_TURN
    assert ex["input_ids"][-len(supervised) :].tolist() == supervised
    assert int(ex["mm_token_type_ids"].sum()) == int(ex["image_grid_thw"].prod(-1).sum()) // 4


def test_router_training_input_equals_inference_input(processor, samples):
    """The router sees the same prompt tokens and pixels in training and at inference."""
    for s in samples:
        train_ex = encode_sample(processor, s, "router", NAMES)
        (prompt,) = encode_router_prompts(processor, [s], NAMES)
        n = len(prompt["input_ids"])
        assert train_ex["input_ids"][:n].tolist() == prompt["input_ids"].tolist()
        assert torch.equal(train_ex["pixel_values"], prompt["pixel_values"])
        assert (train_ex["labels"][:n] == IGNORE_INDEX).all()
        label = label_token_ids(processor.tokenizer, NAMES)[NAMES.index(s.expert)]
        assert train_ex["input_ids"][n:].tolist() == label


def test_collate_pads_and_keeps_masks(processor, samples):
    exs = [encode_sample(processor, s, "sft") for s in samples[:2]]
    batch = collate(exs, processor.tokenizer.pad_token_id)
    longest = max(len(e["input_ids"]) for e in exs)
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in exs)
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in exs)


def test_scores_do_not_depend_on_batch_composition(model, processor, samples):
    pad = processor.tokenizer.pad_token_id
    labels = label_token_ids(processor.tokenizer, NAMES)
    prompts = encode_router_prompts(processor, samples, NAMES)
    together = score_encoded(model, prompts, labels, pad)
    alone = torch.cat([score_encoded(model, [p], labels, pad) for p in prompts])
    assert torch.allclose(together, alone, atol=1e-4)
    probs = route_probs(model, processor, samples, NAMES, batch_size=3)
    assert torch.allclose(probs.sum(-1), torch.ones(len(samples)), atol=1e-5)


def test_label_score_matches_teacher_forced_loss(model, processor, samples):
    s = samples[1]
    ex = encode_sample(processor, s, "router", NAMES)
    batch = collate([ex], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    n_label = int((ex["labels"] != IGNORE_INDEX).sum())
    prompts = encode_router_prompts(processor, [s], NAMES)
    scores = score_encoded(
        model, prompts, label_token_ids(processor.tokenizer, NAMES), processor.tokenizer.pad_token_id
    )
    assert scores[0, NAMES.index(s.expert)].item() == pytest.approx(-loss * n_label, rel=1e-4)


def test_lora_targets_only_the_language_model(tiny_model):
    from mole_trainer.config import LoraSpec
    from mole_trainer.model.lora import attach_lora

    peft_model = attach_lora(load_base(str(tiny_model), "float32", "cpu"), LoraSpec(rank=4), seed=0)
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert names and all("language_model" in n for n in names)
    assert not any("visual" in n for n in names)


def test_cache_round_trip_is_exact_and_smaller(tiny_model, processor, samples, tmp_path):
    from mole_trainer.data.preprocess import load_preprocessed, preprocess_splits

    preprocess_splits(
        {"train": samples, "val": [], "test": []},
        tmp_path,
        str(tiny_model),
        "sft",
        min_pixels=4096,
        max_pixels=20000,
    )
    _, payload = load_preprocessed(tmp_path, "train")
    for s, cached in zip(samples, payload["examples"], strict=True):
        fresh = encode_sample(processor, s, "sft")
        assert fresh.keys() == cached.keys()
        for key in fresh:
            assert torch.equal(fresh[key], cached[key]), key
    stored = torch.load(tmp_path / "train.pt", weights_only=True)["examples"][0]
    assert (
        "pixel_values" not in stored and stored["pixel_frames"].numel() * 2 == fresh["pixel_values"].numel()
    )
