"""LLaMA-Factory datasets: a folder with `dataset_info.json` and the `.json` / `.jsonl` files it lists.

A dataset is read by name with the path `DIR#NAME` (DIR holds dataset_info.json), wherever a dataset
folder is expected (dataset.yaml `path`, loras.yaml `data`, `--input`). A lone `DIR#NAME` is the
train split, except records carrying a `split` field; several names give the splits, each file
all of its split: `DIR#NAME,val=NAME2,test=NAME3`. A plain `DIR` whose dataset_info.json lists
one dataset reads that one. Each entry's `formatting` (sharegpt, or alpaca: LLaMA-Factory's
default), `columns` and `tags` say where the turns, roles, system prompt and images are; images
are relative to DIR. Hub, script, ranking and num_samples entries are refused with a message, as
are tools, videos and audios in a record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import DATASET_NAME_SEP, LLAMAFACTORY_INFO_FILE, SPLITS
from .conversation import AlpacaLayout, ShareGPTLayout
from .records import Location, RecordError, Reject, Sample, collect_records, iter_jsonl, path_resolver

SHAREGPT_COLUMNS = ("messages", "system", "images", "tools", "videos", "audios")
ALPACA_COLUMNS = ("prompt", "query", "response", "history", "system", "images", "tools", "videos", "audios")
TAGS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "observation_tag",
    "function_tag",
)
# entry keys that describe a source this reader does not take (hub, script, cloud) or a use it does not serve
UNSUPPORTED_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
KNOWN_KEYS = (
    "file_name",
    "formatting",
    "columns",
    "tags",
    "ranking",
    "split",
    "num_samples",
    "subset",
    "folder",
)
UNSUPPORTED_COLUMNS = ("tools", "videos", "audios")


def parse_selection(text: str, where: str) -> dict[str, str]:
    """{split: dataset name} of the part after '#': `NAME` (train) or `SPLIT=NAME`, comma-separated."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        split, _, name = item.rpartition("=") if "=" in item else ("train", "", item)
        split = {"validation": "val"}.get(split.strip(), split.strip())
        if split not in SPLITS or not name.strip():
            raise UserError(
                f"{where}: '{item}' is not NAME or SPLIT=NAME (SPLIT one of {', '.join(SPLITS)}); "
                "write DIR#NAME or DIR#NAME,val=NAME2,test=NAME3"
            )
        if split in out:
            raise UserError(f"{where}: split '{split}' is named twice")
        out[split] = name.strip()
    return out


def load_info(root: Path) -> dict[str, Any]:
    """The entries of ROOT/dataset_info.json (name -> entry)."""
    path = root / LLAMAFACTORY_INFO_FILE
    if not path.is_file():
        raise UserError(f"{root}: no {LLAMAFACTORY_INFO_FILE} (DIR#NAME names a LLaMA-Factory dataset)")
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise UserError(f"{path}: expected an object mapping dataset names to entries")
    return info


def entry_source(root: Path, name: str, entry: dict) -> tuple[Path, ShareGPTLayout | AlpacaLayout]:
    """(data file, layout) of one dataset_info.json entry; every problem names the entry and key."""
    where = f"{root / LLAMAFACTORY_INFO_FILE}: dataset '{name}'"
    for key in entry:
        if key in UNSUPPORTED_KEYS and "file_name" not in entry:
            raise UserError(f"{where}: '{key}' datasets are not read; give a local 'file_name'")
        if key not in KNOWN_KEYS and key not in UNSUPPORTED_KEYS:
            raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(KNOWN_KEYS)})")
    if entry.get("num_samples") is not None:  # LLaMA-Factory would subsample; refuse rather than differ
        raise UserError(f"{where}: 'num_samples' is not supported (every record is read)")
    if entry.get("ranking"):
        raise UserError(f"{where}: ranking (preference) datasets are not supported")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: 'file_name' must name a .json or .jsonl file in {root}")
    path = root / file_name
    if not path.is_file():
        raise UserError(f"{where}: file_name '{file_name}' not found ({path})")
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(f"{where}: file_name '{file_name}': only .json (an array) and .jsonl files are read")
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in ("sharegpt", "alpaca"):
        raise UserError(f"{where}: formatting '{formatting}' is not 'sharegpt' or 'alpaca'")
    columns = _mapping(
        entry, "columns", SHAREGPT_COLUMNS if formatting == "sharegpt" else ALPACA_COLUMNS, where
    )
    tags = _mapping(entry, "tags", TAGS, where)
    unsupported = tuple(columns.get(c, c) for c in UNSUPPORTED_COLUMNS)
    if formatting == "alpaca":
        if tags:
            raise UserError(f"{where}: 'tags' apply to sharegpt formatting only")
        lay: ShareGPTLayout | AlpacaLayout = AlpacaLayout(
            **{k: v for k, v in columns.items() if k not in UNSUPPORTED_COLUMNS}, unsupported=unsupported
        )
    else:
        defaults = {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
        }
        t = {**defaults, **tags}
        lay = ShareGPTLayout(
            messages=columns.get("messages", "conversations"),
            images=columns.get("images", "images"),
            system=columns.get("system", "system"),
            role_tags=(t["role_tag"],),
            content_tags=(t["content_tag"],),
            roles={
                "system": (t["system_tag"],),
                "user": (t["user_tag"],),
                "assistant": (t["assistant_tag"],),
            },
            unsupported=unsupported,
        )
    return path, lay


def _mapping(entry: dict, key: str, allowed: tuple[str, ...], where: str) -> dict[str, str]:
    value = entry.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise UserError(f"{where}: '{key}' must map names to non-empty strings")
    for k in value:
        if k not in allowed:
            raise UserError(f"{where}: {key}.{k} is not one of {', '.join(allowed)}")
    return value


def iter_json_array(path: Path) -> Iterator[tuple[int, dict | RecordError]]:
    """(line of the record's start, record) for each element of a JSON array file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise UserError(f"{path}: expected a JSON array of records ([{{...}}, ...])")
    i, line, seen = skip(i + 1), 1, 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", seen, i)
        seen = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if isinstance(obj, dict):
            yield line, obj
        else:
            yield (
                line,
                RecordError(Location(str(path), line), f"expected a JSON object, got {type(obj).__name__}"),
            )
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise UserError(f"{path}: text after the closing ']' of the array")
            return
        else:
            at = line + text.count("\n", seen, i)
            raise UserError(f"{path}:{at}: expected ',' or ']' after a record")


def read_llamafactory(
    root: Path, selection: str | None, decode: bool = True, strict: bool = True
) -> tuple[dict[str, list[Sample]], list[Reject]]:
    """({split: samples}, rejects) of the datasets `selection` names (see the module docstring)."""
    root = Path(root)
    info = load_info(root)
    where = f"{root}{DATASET_NAME_SEP}{selection}" if selection is not None else str(root)
    if selection is None:
        if len(info) != 1:
            raise UserError(
                f"{root / LLAMAFACTORY_INFO_FILE} lists {len(info)} datasets ({', '.join(info) or 'none'}); "
                f"name one as {root}{DATASET_NAME_SEP}NAME"
            )
        selection = next(iter(info))
    chosen = parse_selection(selection, where)
    out: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    rejects: list[Reject] = []
    for split, name in chosen.items():
        if name not in info:
            raise UserError(
                f"{where}: no dataset '{name}' in {root / LLAMAFACTORY_INFO_FILE} ({', '.join(info) or 'none'})"
            )
        path, lay = entry_source(root, name, info[name])
        rows = iter_json_array(path) if path.suffix == ".json" else iter_jsonl(path)
        items = (
            (Location(str(path), line), _refuse_unsupported(obj, lay, path, line), f"{name}-{n}")
            for n, (line, obj) in enumerate(rows, start=1)
        )
        fixed = split if len(chosen) > 1 or split != "train" else None  # a lone NAME: records' split fields
        samples, bad = collect_records(items, path_resolver(root), decode, strict, fixed, lay)
        rejects += bad
        for s in samples:
            out[fixed or s.split or "train"].append(s)
    return out, rejects


def _refuse_unsupported(obj, lay, path: Path, line: int):
    """A record using tools, videos or audios becomes a RecordError (mole trains on images and text)."""
    if isinstance(obj, dict):
        for col in lay.unsupported:
            if obj.get(col):
                rid = obj.get("id") if isinstance(obj.get("id"), str) else None
                reason = f"field '{col}' is not supported (mole trains on images and text)"
                return RecordError(Location(str(path), line), reason, rid)
    return obj
