"""`mole data convert`: rewrite an expert dataset (any format mole reads, LLaMA-Factory's included) as
messages JSONL, ShareGPT JSONL or a Hugging Face datasets folder; system prompts, every turn and
the images' places in the turns are kept.

The JSONL outputs are standard dataset folders (train/val/test.jsonl + images/). Images inside the
source folder keep their relative path; images without one (extracted from embedded bytes) are
named by the sha256 of their bytes. The HF output embeds the image bytes (Image() features) and
keeps metadata as a JSON string column, since Arrow needs one schema for every row's metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..layout import REJECTS_FILE, SPLITS
from .formats import read_dataset, sample_to_record, sample_to_sharegpt, split_dataset_path
from .records import Sample, write_jsonl

TARGETS = ("messages", "sharegpt", "hf")


def convert_dataset(src: str | Path, dest: str | Path, to: str = "messages", strict: bool = False) -> dict:
    """Read `src` (images decoded and checked) and write it to `dest` in format `to`; returns counts.

    Bad records are left out and listed in DEST/rejects.jsonl (or raise with `strict`).
    """
    if to not in TARGETS:
        raise UserError(f"unknown target format '{to}' (expected one of {', '.join(TARGETS)})")
    src_root, dest = split_dataset_path(src)[0], Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest}: output folder exists and is not empty")
    if dest.resolve() == src_root.resolve():
        raise UserError(f"{dest}: the output folder must differ from the input")
    splits, rejects = read_dataset(src, decode=True, strict=strict)
    dest.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        write_hf_dataset(splits, dest)
    else:
        write_jsonl_dataset(splits, dest, src_root, sharegpt=to == "sharegpt")
    write_jsonl(dest / REJECTS_FILE, [r.to_dict() for r in rejects])
    accepted = {split: len(splits[split]) for split in SPLITS}
    return {
        "output": str(dest),
        "format": to,
        "counts": accepted,
        "records": {
            "input": sum(accepted.values()) + len(rejects),
            "accepted": sum(accepted.values()),
            "rejected": len(rejects),
        },
    }


def _image_name(path: Path, src_root: Path) -> str:
    """Relative path an image gets in the output: its own inside the source, else images/<file name>."""
    src_root = src_root.resolve()
    if path.is_relative_to(src_root):
        return path.relative_to(src_root).as_posix()
    return f"images/{path.name}"  # extracted images are named by their content hash


def write_jsonl_dataset(splits: dict[str, list[Sample]], dest: Path, src_root: Path, sharegpt: bool) -> None:
    """Write train/val/test.jsonl (messages or ShareGPT records) and copy the images under `dest`."""
    to_record = sample_to_sharegpt if sharegpt else sample_to_record
    copied: dict[str, Path] = {}
    for split in SPLITS:
        records = []
        for s in splits.get(split, []):
            names = []
            for p in s.images:
                name = _image_name(p, src_root)
                if copied.setdefault(name, p) != p:
                    raise UserError(f"{s.source}: two different images would both be written as {name}")
                target = dest / name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                names.append(name)
            records.append(to_record(s, names))
        if records or split == "train":
            write_jsonl(dest / f"{split}.jsonl", records)


def hf_features():
    """Arrow schema of the HF form: every turn a list of {type, text} parts, images embedded."""
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "id": Value("string"),
            "images": List(Image()),
            "messages": List({"role": Value("string"), "content": List(part)}),
            "metadata": Value("string"),
            "expert": Value("string"),
            "split": Value("string"),
        }
    )


def hf_messages(s: Sample) -> list[dict]:
    """A sample's system prompt and turns, every content a list of {type, text} parts (one Arrow schema)."""
    msgs = [] if s.system is None else [{"role": "system", "content": [{"type": "text", "text": s.system}]}]
    for t in s.conversation():
        if t["role"] == "user":
            content = [{"type": p["type"], "text": p.get("text")} for p in t["content"]]
        else:
            content = [{"type": "text", "text": t["content"]}]
        msgs.append({"role": t["role"], "content": content})
    return msgs


def write_hf_dataset(splits: dict[str, list[Sample]], dest: Path) -> None:
    """save_to_disk a DatasetDict (train/val/test) of the samples, image bytes embedded."""
    from datasets import (
        Dataset,
        DatasetDict,
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    features = hf_features()
    parts = {}
    for split in SPLITS:
        rows = {name: [] for name in features}
        for s in splits.get(split, []):
            rows["id"].append(s.id)
            rows["images"].append([str(p) for p in s.images])
            rows["messages"].append(hf_messages(s))
            rows["metadata"].append(json.dumps(s.metadata, ensure_ascii=False))
            rows["expert"].append(s.expert)
            rows["split"].append(s.split)
        if rows["id"] or (split == "train" and not any(splits.values())):
            # an empty split is left out: `datasets` writes it but cannot load it back
            parts[split] = Dataset.from_dict(rows, features=features)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # our own summary reports what was written
    try:
        DatasetDict(parts).save_to_disk(str(dest))
    finally:
        if not quiet:
            enable_progress_bars()
