"""Preprocessing (label masks, collation) and router scoring on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import IGNORE_INDEX, collate, encode_sample
from mole_trainer.errors import UserError
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


@pytest.mark.slow  # seconds: left out of make test-fast
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
    stored = torch.load(tmp_path / "train-00000.pt", weights_only=True)["examples"][0]
    # the resized uint8 image, compressed: smaller than even its uint8 patches (an eighth of the float32)
    assert "pixel_values" not in stored and stored["pixel_zlib"].dtype == torch.uint8
    assert stored["pixel_zlib"].numel() * 8 < fresh["pixel_values"].numel() * 4


# --- parallel preprocessing, rejects, relocatable cache ----------------------------------------------


def _bad_dataset(synth_data, tmp_path):
    """The calendar dataset plus a broken image record and a bad JSON line in train."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_data / "calendar", root)
    lines = (root / "train.jsonl").read_text().splitlines()
    broken = (
        lines[0]
        .replace("calendar-train-00000", "broken")
        .replace("images/calendar-train-00000.png", "images/broken.png")
    )
    data = (root / "images/calendar-train-00000.png").read_bytes()
    (root / "images/broken.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    (root / "train.jsonl").write_text("\n".join([*lines[:3], broken, "{not json", *lines[3:]]) + "\n")
    return root


@pytest.mark.slow
def test_workers_give_identical_cache_and_reconciled_rejects(tiny_model, synth_data, tmp_path, monkeypatch):
    from mole_trainer.data import preprocess
    from mole_trainer.data.formats import read_dataset
    from mole_trainer.data.preprocess import load_preprocessed, preprocess_splits

    monkeypatch.setattr(preprocess, "SHARD_RECORDS", 5)  # several shards per split: the workers share them
    root = _bad_dataset(synth_data, tmp_path)
    splits, rejects = read_dataset(root, decode=False, strict=False)
    metas = {}
    for n in (1, 2):
        metas[n] = preprocess_splits(
            splits, tmp_path / f"w{n}", str(tiny_model), "sft", None, 4096, 20000, workers=n, rejects=rejects
        )
    assert metas[1] == metas[2] and len(metas[1]["shards"]["train"]) == 3
    assert metas[1]["records"] == {"input": 24, "accepted": 22, "rejected": 2}
    assert metas[1]["counts"] == {"train": 12, "val": 4, "test": 6}
    assert (tmp_path / "w1/rejects.jsonl").read_text() == (tmp_path / "w2/rejects.jsonl").read_text()
    bad = [json.loads(x) for x in (tmp_path / "w2/rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in bad] == [(4, "broken"), (5, None)]
    assert "cannot be decoded" in bad[0]["reason"] and "not valid JSON" in bad[1]["reason"]
    for split in ("train", "val", "test"):
        (_, a), (_, b) = load_preprocessed(tmp_path / "w1", split), load_preprocessed(tmp_path / "w2", split)
        assert len(a["examples"]) == len(b["examples"]) == metas[1]["counts"][split]
        for x, y in zip(a["examples"], b["examples"], strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert [d["id"] for d in a["samples"]] == [d["id"] for d in b["samples"]]


@pytest.mark.slow
def test_strict_fails_on_a_bad_record_and_cache_moves_with_its_data(tiny_model, synth_data, tmp_path):
    import shutil

    from mole_trainer.data.formats import load_expert_dataset, read_dataset
    from mole_trainer.data.preprocess import load_preprocessed, preprocess_splits

    root = _bad_dataset(synth_data, tmp_path)
    splits, rejects = read_dataset(root, decode=False, strict=False)
    with pytest.raises(UserError, match=r"train.jsonl:4 \(id broken\): image .*cannot be decoded"):
        preprocess_splits(splits, tmp_path / "p", str(tiny_model), "sft", None, 4096, 20000, strict=True)

    work = tmp_path / "work"
    shutil.copytree(synth_data / "ocr", work / "data")
    preprocess_splits(
        load_expert_dataset(work / "data"), work / "prep", str(tiny_model), "sft", None, 4096, 20000
    )
    work.rename(tmp_path / "moved")
    _, payload = load_preprocessed(tmp_path / "moved/prep", "test")
    images = [Path(p) for d in payload["samples"] for p in d["images"]]
    assert images and all(p.is_file() and p.resolve().is_relative_to(tmp_path / "moved") for p in images)
