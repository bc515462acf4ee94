"""Preprocessing for Qwen3-VL: chat template, pixel budget, label masks, cached on disk.

An example is a dict of tensors (input_ids, attention_mask, mm_token_type_ids, labels,
pixel_values, image_grid_thw). Only the assistant answer (and its end-of-turn token) is
supervised; everything before it is masked with -100. The cache folder holds one `<split>.pt`
per split and `meta.json` describing what made it (task, base, processor digest, pixel budget), so
training steps never re-run the processor; only generation-based scoring (validation routing
accuracy, expert task metrics) re-encodes the prompts of the records it scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import LABEL_MAP_FILE, PREPROCESS_META_FILE, SPLITS
from ..model.chat import END_OF_TURN
from ..router_prompt import label_names, router_messages
from .formats import Sample

IGNORE_INDEX = -100
CACHE_FORMAT = "mole-preprocessed-v1"
TASKS = ("sft", "router")


def load_images(sample: Sample):
    """Open a sample's images as RGB PIL images."""
    from PIL import Image

    out = []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except Exception as exc:
            raise UserError(f"{sample.source}: image '{p}' cannot be decoded ({exc})") from None
    return out


def prompt_messages(sample: Sample, task: str, names: list[str] | None) -> list[dict]:
    """The user turn the model sees for this task (the expert's own, or the router prompt)."""
    if task == "router":
        return router_messages(sample.instruction, len(sample.images), names)
    return sample.messages(with_answer=False)


def target_text(sample: Sample, task: str) -> str:
    """What the model must answer: the expert name for the router, the assistant answer otherwise."""
    return sample.expert if task == "router" else sample.answer


def encode_prompt(processor, messages: list[dict], images) -> dict:
    """Processor output for a prompt ending in the assistant header (what generation starts from)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")


def encode_example(processor, messages: list[dict], answer: str, images) -> dict[str, Any]:
    """Tokenise prompt + answer; mask everything but the answer tokens and the end-of-turn token."""
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answer_part = answer + END_OF_TURN
    enc = processor(text=[prompt + answer_part], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0]
    answer_ids = processor.tokenizer(answer_part, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids) - len(answer_ids)
    if ids[n_prompt:].tolist() != answer_ids:
        raise ValueError("the answer does not tokenise the same alone as after the prompt")
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    example = {k: v[0] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw")}
    example["labels"] = labels
    if "pixel_values" in enc:
        example["pixel_values"] = enc["pixel_values"]
        example["image_grid_thw"] = enc["image_grid_thw"]
    return example


def encode_sample(processor, sample: Sample, task: str, names: list[str] | None = None) -> dict[str, Any]:
    """One training example for a sample (task 'sft' for experts, 'router' for the router)."""
    try:
        return encode_example(
            processor, prompt_messages(sample, task, names), target_text(sample, task), load_images(sample)
        )
    except ValueError as exc:
        raise UserError(f"{sample.source}: cannot encode this record ({exc})") from None


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of examples into one batch (pixel patches concatenated in order)."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    fill = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, Any] = {}
    for key, value in fill.items():
        if key not in examples[0]:
            continue
        rows = []
        for e in examples:
            t = e[key]
            pad = torch.full((longest - len(t),), value, dtype=t.dtype)
            rows.append(torch.cat([t, pad]) if padding_side == "right" else torch.cat([pad, t]))
        batch[key] = torch.stack(rows)
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return batch


def compact_frames(example: dict, temporal: int) -> dict:
    """Store an image's pixel patches once instead of `temporal` identical copies (exact, lossless).

    Qwen's processor repeats a still image along the temporal axis of every patch vector, laid out
    (channel, temporal, patch_h * patch_w); the copies are identical, so the cache keeps one.
    """
    import torch

    pv = example.get("pixel_values")
    if pv is None or temporal == 1:
        return example
    frames = pv.view(pv.shape[0], 3, temporal, -1)
    if not all(torch.equal(frames[:, :, 0], frames[:, :, t]) for t in range(1, temporal)):
        return example
    out = {k: v for k, v in example.items() if k != "pixel_values"}
    out["pixel_frames"] = frames[:, :, 0].contiguous()
    return out


def expand_frames(example: dict, temporal: int) -> dict:
    """Inverse of compact_frames: the exact pixel_values the processor produced."""
    if "pixel_frames" not in example:
        return example
    f = example.pop("pixel_frames")
    example["pixel_values"] = f.unsqueeze(2).expand(-1, -1, temporal, -1).reshape(f.shape[0], -1)
    return example


def sample_to_dict(s: Sample) -> dict:
    """Plain form of a sample kept beside its encoding (generation-based evaluation needs it)."""
    return {
        "id": s.id,
        "images": [str(p) for p in s.images],
        "instruction": s.instruction,
        "answer": s.answer,
        "expert": s.expert,
        "metadata": s.metadata,
        "source": s.source,
    }


def sample_from_dict(d: dict) -> Sample:
    """Inverse of sample_to_dict."""
    return Sample(
        id=d["id"],
        images=[Path(p) for p in d["images"]],
        instruction=d["instruction"],
        answer=d["answer"],
        metadata=d["metadata"],
        expert=d["expert"],
        source=d["source"],
    )


def fingerprint(*parts: Any) -> str:
    """Short sha256 of JSON-serialisable parts (configs, file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def preprocess_splits(
    splits: dict[str, list[Sample]],
    output: str | Path,
    model: str,
    task: str = "sft",
    label_map: dict[str, int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    progress=None,
    source: str | None = None,
) -> dict:
    """Encode every split and write the cache folder; returns the metadata written to meta.json."""
    import torch

    from ..model.loading import load_processor, processor_digest

    if task not in TASKS:
        raise UserError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})")
    names = None
    if task == "router":
        if not label_map:
            raise UserError("router preprocessing needs a label map")
        names = label_names(label_map)
        for samples in splits.values():
            for s in samples:
                if s.expert not in label_map:
                    raise UserError(
                        f"{s.source}: expert '{s.expert}' is not in the label map ({', '.join(names)})"
                    )
    processor = load_processor(model, min_pixels, max_pixels)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        samples = splits.get(split, [])
        examples = []
        for s in samples:
            examples.append(encode_sample(processor, s, task, names))
            if progress:
                progress()
        temporal = processor.image_processor.temporal_patch_size
        torch.save(
            {
                "examples": [compact_frames(e, temporal) for e in examples],
                "samples": [sample_to_dict(s) for s in samples],
            },
            out / f"{split}.pt",
        )
        counts[split] = len(examples)
    size = processor.image_processor.size
    meta = {
        "temporal_patch_size": processor.image_processor.temporal_patch_size,
        "format": CACHE_FORMAT,
        "task": task,
        "model": model,
        "processor_digest": processor_digest(model),
        "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"],
        "counts": counts,
        "label_map": label_map,
        "source": source,
    }
    (out / PREPROCESS_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if label_map:
        (out / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")
    return meta


def code_digest() -> str:
    """sha256 of this package's code and packaged configs: any change to the tool re-runs the stages."""
    import hashlib

    root = Path(__file__).parent.parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def dataset_digest(root: str | Path) -> str:
    """sha256 over every file below a dataset folder (names and bytes), for cache invalidation."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def check_compatible(meta: dict, task: str, base_model: str, image, where: str | Path) -> None:
    """Preprocessed data must match the training run: task, tokenizer/processor, pixel budget."""
    from ..model.loading import processor_digest

    if meta["task"] != task:
        raise UserError(
            f"{where}: preprocessed for task '{meta['task']}', expected '{task}' "
            f"(run 'mole data preprocess --task {task}')"
        )
    if meta.get("processor_digest") != processor_digest(base_model):
        raise UserError(
            f"{where}: preprocessed with the processor of {meta['model']}, which differs from "
            f"{base_model}'s; preprocess again with --model {base_model}"
        )
    check_pixels(meta, image, where)


def check_pixels(meta: dict, image, where: str | Path) -> None:
    """The pixel budget of preprocessed data must be the one the training config declares."""
    if (meta["min_pixels"], meta["max_pixels"]) != (image.min_pixels, image.max_pixels):
        raise UserError(
            f"{where}: preprocessed with min_pixels={meta['min_pixels']} max_pixels={meta['max_pixels']}, "
            f"but the config asks image.min_pixels={image.min_pixels} image.max_pixels={image.max_pixels}; "
            "re-run 'mole data preprocess' with the config's values or change the config"
        )


def is_preprocessed(path: str | Path) -> bool:
    """True when `path` is a cache folder written by preprocess_splits."""
    meta = Path(path) / PREPROCESS_META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == CACHE_FORMAT
    except json.JSONDecodeError:
        return False


def load_preprocessed(path: str | Path, split: str) -> tuple[dict, dict]:
    """(metadata, split payload) of a cache folder; payload['examples'] is the list of examples."""
    import torch

    path = Path(path)
    if not is_preprocessed(path):
        raise UserError(
            f"{path}: not a preprocessed dataset (no {PREPROCESS_META_FILE}; run 'mole data preprocess')"
        )
    meta = json.loads((path / PREPROCESS_META_FILE).read_text())
    f = path / f"{split}.pt"
    if not f.is_file():
        raise UserError(f"{path}: split file {f.name} is missing")
    # memory-mapped: tensors are read from disk when a batch touches them, not all at once
    payload = torch.load(f, weights_only=True, mmap=True)
    payload["examples"] = CachedExamples(payload["examples"], meta["temporal_patch_size"])
    return meta, payload


class CachedExamples(Sequence):
    """Examples of a cache split; each one's pixel patches are expanded when it is accessed."""

    def __init__(self, stored: list[dict], temporal: int):
        self.stored, self.temporal = stored, temporal

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return expand_frames(dict(self.stored[index]), self.temporal)
