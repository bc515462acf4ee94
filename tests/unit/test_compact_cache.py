"""The compact preprocessing cache (resized images as PNG) and hashing each dataset once, streamed."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import (
    encode_prompt,
    load_images,
    load_preprocessed,
    preprocess_splits,
    prompt_messages,
)
from mole_trainer.errors import UserError

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]
LABELS = {n: i for i, n in enumerate(NAMES)}
REAL_PROCESSOR = Path(__file__).parents[1] / "fixtures" / "qwen3-vl-8b-processor"


@pytest.fixture(scope="module")
def samples(synth_data):
    """Two test records per expert, labelled with their expert."""
    out = []
    for name in NAMES:
        for s in load_expert_dataset(synth_data / name)["test"][:2]:
            s.expert = name
            out.append(s)
    return out


def live_pixels(processor, sample, task):
    """pixel_values of the inference path: the prompt encoded live by the processor (infer/, generate)."""
    names = NAMES if task == "router" else None
    return encode_prompt(processor, prompt_messages(sample, task, names), load_images(sample))["pixel_values"]


# the tiny model's processor normalises with CLIP's mean/std, the real Qwen3-VL one with 0.5/0.5;
# 4096..20000 pixels upscales some images and downscales others
@pytest.mark.parametrize(
    ("which", "task"),
    [("tiny", "router"), ("tiny", "sft"), pytest.param("real", "router", marks=pytest.mark.slow)],
)
def test_cached_pixels_are_bit_equal_to_a_live_processor_call(which, task, tiny_model, samples, tmp_path):
    from mole_trainer.model.loading import load_processor

    model = str(tiny_model if which == "tiny" else REAL_PROCESSOR)
    meta = preprocess_splits({"test": samples}, tmp_path, model, task, LABELS, 4096, 20000)
    assert meta["pixels"]["storage"] == ["uint8-zlib"]
    processor = load_processor(model, 4096, 20000)
    _, payload = load_preprocessed(tmp_path, "test")
    assert len(payload["examples"]) == len(samples)
    for s, example in zip(samples, payload["examples"], strict=True):
        live = live_pixels(processor, s, task)
        assert example["pixel_values"].dtype == live.dtype == torch.float32
        assert torch.equal(example["pixel_values"], live), s.id
        assert example["input_ids"].dtype == torch.int64


def test_a_rebuild_that_differs_falls_back_to_exact_float_storage(tiny_model, samples, tmp_path, monkeypatch):
    from mole_trainer.data import pixels
    from mole_trainer.model.loading import load_processor

    real = pixels.normalize
    monkeypatch.setattr(pixels, "normalize", lambda image, spec: real(image, spec) * 1.0001)
    meta = preprocess_splits({"test": samples[:3]}, tmp_path, str(tiny_model), "router", LABELS, 4096, 20000)
    assert meta["pixels"]["storage"] == ["float32"]
    stored = torch.load(tmp_path / "test-00000.pt", weights_only=True)["examples"]
    assert all(pixels.FRAMES_KEY in e and pixels.ZLIB_KEY not in e for e in stored)
    processor = load_processor(str(tiny_model), 4096, 20000)
    _, payload = load_preprocessed(tmp_path, "test")
    for s, example in zip(samples[:3], payload["examples"], strict=True):
        assert torch.equal(example["pixel_values"], live_pixels(processor, s, "router"))


def test_only_still_images_are_stored_compact(tiny_model, samples, monkeypatch):
    """One temporal copy is stored: patches whose copies differ are refused, not silently cut."""
    from mole_trainer.data.pixels import COMPACT, PixelSpec, pack_example
    from mole_trainer.data.preprocess import encode_sample
    from mole_trainer.model.loading import load_processor

    processor = load_processor(str(tiny_model), 4096, 20000)
    raw = encode_sample(processor, samples[0], "router", NAMES, raw_pixels=True)
    spec = PixelSpec.of(processor.image_processor)
    rows = raw["pixel_values"].view(raw["pixel_values"].shape[0], 3, spec.temporal_patch_size, -1)
    rows[5, 1, 1, 7] ^= 1  # one value of the second temporal copy
    with pytest.raises(ValueError, match="temporal copies"):
        pack_example(raw, spec, COMPACT)


def test_an_older_cache_is_refused_with_what_to_run(tiny_model, samples, tmp_path):
    from mole_trainer.data.preprocess import is_preprocessed

    preprocess_splits({"test": samples[:1]}, tmp_path, str(tiny_model), "router", LABELS, 4096, 20000)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["format"] = "mole-preprocessed-v2"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert is_preprocessed(tmp_path)  # recognised, so not mistaken for a dataset folder
    with pytest.raises(
        UserError, match=r"older mole-trainer \(format mole-preprocessed-v2.*mole data preprocess"
    ):
        load_preprocessed(tmp_path, "test")


# --- hashing: one streaming hasher, each dataset once per run --------------------------------------------


def test_dataset_digest_streams_in_chunks_and_keeps_its_value(synth_data, monkeypatch):
    from mole_trainer import hashing
    from mole_trainer.data.preprocess import dataset_digest

    root = synth_data / "ocr"
    h = hashlib.sha256()  # the digest's definition: each relative name, then the sha256 of its bytes
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    monkeypatch.setattr(hashing, "CHUNK", 1000)  # many chunks per image file

    def no_whole_reads(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    assert dataset_digest(root) == h.hexdigest()


def test_each_dataset_is_hashed_once_per_run_and_passed_on(synth_data, tiny_model, tmp_path, monkeypatch):
    """stages hash each expert's data once and hand the digests to training; preprocessing reuses them."""
    import yaml

    from mole_trainer import hashing, stages
    from mole_trainer.data.preprocess import dataset_digest
    from mole_trainer.train import expert_jobs, experts

    from ..helpers import write_small_configs

    write_small_configs(tmp_path / "config")
    cfg_path = tmp_path / "config/loras.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["base_model"] = str(tiny_model)
    for name in NAMES:
        cfg["experts"][name]["data"] = str(synth_data / name)
    cfg_path.write_text(yaml.safe_dump(cfg))
    expected = {n: dataset_digest(synth_data / n) for n in ("calendar", "ocr")}

    hashed, passed, built = [], {}, []
    real_folder_digest, real_preprocess = hashing.folder_digest, expert_jobs.preprocess_splits

    def counting_digest(root, *args, **kwargs):
        hashed.append(Path(root))
        return real_folder_digest(root, *args, **kwargs)

    def counting_preprocess(*args, **kwargs):
        built.append(kwargs["source"])
        return real_preprocess(*args, **kwargs)

    def fake_training(*args, digests=None, **kwargs):
        passed.update(digests)
        return {}

    monkeypatch.setattr(hashing, "folder_digest", counting_digest)
    monkeypatch.setattr(expert_jobs, "preprocess_splits", counting_preprocess)
    monkeypatch.setattr(experts, "train_experts", fake_training)
    stages.train_experts(cfg_path, tmp_path, only=["calendar", "ocr"])
    assert sorted(hashed) == [synth_data / "calendar", synth_data / "ocr"]
    assert passed == expected

    # preparing an expert with its digest given does not hash the data again; the cache it builds
    # is reused for the same digest and rebuilt for another
    hashed.clear()
    lcfg = stages.load_config(cfg_path, stages.LorasConfig)
    cache, data, model = tmp_path / "cache", str(synth_data / "ocr"), str(tiny_model)
    loaded = []
    real_load = expert_jobs.load_expert_dataset
    monkeypatch.setattr(
        expert_jobs, "load_expert_dataset", lambda root: loaded.append(root) or real_load(root)
    )
    for digest in (expected["ocr"], expected["ocr"], "0" * 64):
        assert expert_jobs.prepared_data("ocr", data, cache, model, lcfg, digest) == cache
    assert hashed == [] and len(built) == 2 and built[0] != built[1]
    assert loaded == [data, data]  # a cache hit reads (and decodes) nothing of the dataset
