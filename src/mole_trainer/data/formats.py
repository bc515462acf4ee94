"""Expert dataset folders in four formats, read into validated Samples, strictly or with a rejects list.

A dataset is a folder in one of four formats (detected per folder, and per record for JSONL; the
record forms and their rules are in records.py):

* messages JSONL (the native format): train.jsonl / val.jsonl / test.jsonl and the images they name;
* ShareGPT JSONL, as LLaMA-Factory, LLaVA and older Qwen tooling write it, in the same split files;
* a Hugging Face `datasets` folder written by save_to_disk: a DatasetDict with train / val
  (or validation) / test splits, or a single Dataset (split from a 'split' column, else train),
  with the columns of either form above; image columns hold Image() features (embedded bytes,
  extracted into a content-addressed cache folder) or paths.
* a LLaMA-Factory folder: dataset_info.json and the .json arrays / .jsonl files it lists, read by
  name as `DIR#NAME` (llamafactory.py).

Samples are written back as messages or ShareGPT records (sample_to_record, sample_to_sharegpt).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import (
    DATASET_NAME_SEP,
    HF_DATASET_DICT_FILE,
    HF_DATASET_STATE_FILE,
    LLAMAFACTORY_INFO_FILE,
    SPLITS,
)
from .conversation import placeholder_text
from .records import (
    ImageResolver,
    Location,
    Reject,
    Sample,
    collect_records,
    read_jsonl_samples,
    resolve_image,
    store_image_bytes,
)

# Hugging Face split names accepted for each of ours
HF_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def is_hf_dataset(root: str | Path) -> bool:
    """True for a folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    root = Path(root)
    return (root / HF_DATASET_DICT_FILE).is_file() or (root / HF_DATASET_STATE_FILE).is_file()


def split_dataset_path(path: str | Path) -> tuple[Path, str | None]:
    """(folder, dataset selection) of a dataset path: `DIR` or `DIR#NAME...` (LLaMA-Factory, by name).

    A path that exists as it is written is a folder, even with a '#' in its name.
    """
    text = str(path)
    if Path(text).exists() or DATASET_NAME_SEP not in text:
        return Path(text), None
    folder, _, selection = text.rpartition(DATASET_NAME_SEP)
    return Path(folder), selection


def dataset_exists(path: str | Path) -> bool:
    """True when a dataset path's folder exists (the dataset itself is checked when it is read)."""
    return split_dataset_path(path)[0].is_dir()


def is_llamafactory(path: str | Path) -> bool:
    """True for `DIR#NAME`, or a folder with dataset_info.json and no train/val/test.jsonl (and not
    written by `datasets`, whose save_to_disk writes a dataset_info.json of its own)."""
    root, selection = split_dataset_path(path)
    if selection is not None:
        return True
    return (
        (root / LLAMAFACTORY_INFO_FILE).is_file()
        and not is_hf_dataset(root)
        and not any((root / f"{split}.jsonl").is_file() for split in SPLITS)
    )


def read_dataset(
    root: str | Path, decode: bool = True, strict: bool = True
) -> tuple[dict[str, list[Sample]], list[Reject]]:
    """({split: samples}, rejects) of a dataset in any of the formats (module docstring).

    `root` is a folder, or `DIR#NAME` for a LLaMA-Factory dataset listed in DIR/dataset_info.json.
    Missing split files are empty splits; a dataset with no record at all is an error either way.
    """
    folder, selection = split_dataset_path(root)
    if not folder.is_dir():
        raise UserError(f"{folder}: dataset folder not found")
    if is_llamafactory(root):
        from .llamafactory import read_llamafactory

        out, rejects = read_llamafactory(folder, selection, decode, strict)
    elif is_hf_dataset(folder):
        out, rejects = read_hf_dataset(folder, decode, strict)
    else:
        out, rejects = {}, []
        for split in SPLITS:
            f = folder / f"{split}.jsonl"
            samples, bad = read_jsonl_samples(f, folder, decode, strict, split) if f.is_file() else ([], [])
            out[split] = samples
            rejects += bad
    if not any(out.values()) and not rejects:
        raise UserError(
            f"{root}: no records (expected train.jsonl / val.jsonl / test.jsonl with at least one line, "
            "a Hugging Face datasets folder written by save_to_disk, or a LLaMA-Factory dataset_info.json)"
        )
    return out, rejects


def load_expert_dataset(root: str | Path, decode: bool = True) -> dict[str, list[Sample]]:
    """Load train/val/test of one expert dataset folder (any format); the first bad record raises."""
    return read_dataset(root, decode, strict=True)[0]


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets folders


def _hf_resolver(root: Path) -> ImageResolver:
    def resolve(value: Any, where: str) -> Path:
        if isinstance(value, dict):  # an Image() feature, as stored: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return store_image_bytes(value["bytes"], value.get("path"))
            value = value.get("path")
        return resolve_image(root, value, where)

    return resolve


def read_hf_dataset(
    root: str | Path, decode: bool = True, strict: bool = True
) -> tuple[dict[str, list[Sample]], list[Reject]]:
    """({split: samples}, rejects) of a save_to_disk folder; rows read raw (image bytes not decoded)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    root = Path(root)
    try:
        ds = load_from_disk(str(root))
    except Exception as exc:
        raise UserError(
            f"{root}: cannot read the Hugging Face dataset ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(ds, DatasetDict):
        parts: dict[str | None, Dataset] = {}
        for name, part in ds.items():
            ours = HF_SPLIT_NAMES.get(name)
            if ours is None or ours in parts:
                raise UserError(
                    f"{root}: split '{name}' is not one of train, val (or validation), test"
                    + (" (given twice)" if ours in parts else "")
                )
            parts[ours] = part
    else:
        parts = {None: ds}
    out: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    rejects: list[Reject] = []
    resolver = _hf_resolver(root)
    for split, part in parts.items():
        _check_hf_columns(root, split, part.column_names)
        label = f"{root} [{split or 'dataset'}]"
        rows = _hf_rows(part)
        items = ((Location(label, i, "row"), row, f"{split or 'row'}-{i}") for i, row in rows)
        samples, bad = collect_records(items, resolver, decode, strict, split)
        rejects += bad
        for s in samples:
            target = split or s.split or "train"
            out[target].append(s)
    return out, rejects


def _check_hf_columns(root: Path, split: str | None, columns: list[str]) -> None:
    has_turns = "messages" in columns or "conversations" in columns
    has_images = "images" in columns or "image" in columns
    if not (has_turns and has_images):
        raise UserError(
            f"{root} [{split or 'dataset'}]: columns {sorted(columns)} do not form expert records; "
            "expected 'messages' with 'images', or 'conversations' with 'image' or 'images'"
        )


def _hf_rows(part, batch: int = 256) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row as stored) without decoding images: the Arrow table read directly."""
    table = part.with_format("arrow")
    for start in range(0, len(part), batch):
        for j, row in enumerate(table[start : start + batch].to_pylist()):
            yield start + j + 1, {k: v for k, v in row.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# writing


def _head(s: Sample) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": s.id}
    if s.expert is not None:
        rec["expert"] = s.expert
    if s.split is not None:
        rec["split"] = s.split
    return rec


def sample_to_record(s: Sample, image_paths: list[str]) -> dict:
    """Messages-format record of a Sample (system prompt, every turn, images in place), with the
    given (relative) image paths."""
    rec = _head(s)
    rec["images"] = image_paths
    rec["messages"] = [{"role": "system", "content": s.system}] if s.system is not None else []
    rec["messages"] += s.conversation()
    rec["metadata"] = s.metadata
    return rec


def sample_to_sharegpt(s: Sample, image_paths: list[str]) -> dict:
    """ShareGPT record of a Sample (LLaMA-Factory's 'sharegpt' form: `system` field, placeholders in
    place; 'id' and 'metadata' kept)."""
    rec = _head(s)
    if s.system is not None:
        rec["system"] = s.system
    rec["conversations"] = [
        {"from": "human", "value": placeholder_text(t["content"])}
        if t["role"] == "user"
        else {"from": "gpt", "value": t["content"]}
        for t in s.conversation()
    ]
    rec["images"] = image_paths
    rec["metadata"] = s.metadata
    return rec
