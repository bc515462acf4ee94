"""One record of an expert dataset, validated into a Sample; JSONL files of records; their images.

A record comes in one of three forms (detected per record, or given by a LLaMA-Factory layout):

* messages (the native format)::

    {"id": "cal-0001", "images": ["images/cal-0001.png"],
     "messages": [{"role": "system", "content": "..."},                       # optional
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}, ...],
     "metadata": {...}}

* ShareGPT, as LLaMA-Factory, LLaVA and older Qwen tooling write it::

    {"id": "...", "system": "...", "conversations": [{"from": "human", "value": "<image>\\n..."},
     {"from": "gpt", "value": "..."}, ...], "images": ["images/x.png"]}  # or "image": "images/x.png"

  "id" may be left out (it becomes "<split>-<line>"); the system prompt may also be a first
  {"from": "system"} turn.
* alpaca (LLaMA-Factory's default formatting), with the columns its dataset_info.json names.

A conversation is an optional system prompt, then user and assistant turns in alternation,
ending with the assistant. Images stand where their <image> placeholders or image parts are, in
any user turn; their total must equal the record's image list, in the same order. What the
router sees of it is router_request (the user turns' text) plus every image.

Image paths are relative to the dataset root and may not resolve outside it (symlinks included).
Every problem names the file (or dataset folder and split), the line (or row) and the field. The
strict readers raise a RecordError on the first bad record; the lenient ones return it as a
Reject beside the good samples, so input = accepted + rejected always. Whole dataset folders (and
their formats) are read by formats.py, which builds on this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_bytes
from ..errors import UserError
from ..layout import CACHE_DIR_ENV, SPLITS
from .conversation import (
    MESSAGE_ROLES,
    AlpacaLayout,
    ShareGPTLayout,
    check_conversation,
    raw_alpaca,
    raw_messages,
    raw_sharegpt,
    router_request,
)


@dataclass
class Sample:
    """One validated record: a conversation with images, and the two views of it the tool uses.

    `instruction` and `images` are what the router sees (router_request: the user turns' text,
    every image); `answer` is the final assistant turn (what generation-based evaluation scores).
    `turns` is the whole conversation in chat-template form without the system prompt (user
    content as a list of parts with the images in place, assistant content as text); a Sample
    built with turns None is one user turn, images first, then the instruction, and the answer.
    """

    id: str
    images: list[Path]  # absolute paths, in conversation order
    instruction: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    expert: str | None = None
    split: str | None = None
    source: str = ""  # "file:line" (or "folder [split] row N"), for messages
    file: str = ""  # the file (or dataset folder and split) the record came from
    line: int | None = None  # its line (or row) number, 1-based
    system: str | None = None
    turns: list[dict] | None = None
    image_field: str = "images"  # the record's field that lists the images, for messages

    def conversation(self) -> list[dict]:
        """The turns (a copy): `turns`, or the single turn built from instruction and answer."""
        if self.turns is not None:
            return [{"role": t["role"], "content": _copy_content(t["content"])} for t in self.turns]
        content: list[dict] = [{"type": "image"} for _ in self.images]
        content.append({"type": "text", "text": self.instruction})
        return [{"role": "user", "content": content}, {"role": "assistant", "content": self.answer}]

    def messages(self, with_answer: bool = True) -> list[dict]:
        """The conversation in the chat-template form: system prompt, then the turns.

        Without the answer, a final assistant turn is left out: the prompt generation starts from.
        """
        msgs = (
            []
            if self.system is None
            else [{"role": "system", "content": [{"type": "text", "text": self.system}]}]
        )
        turns = self.conversation()
        if not with_answer and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        for t in turns:
            content = t["content"] if t["role"] == "user" else [{"type": "text", "text": t["content"]}]
            msgs.append({"role": t["role"], "content": content})
        return msgs


def _copy_content(content: Any) -> Any:
    return [dict(p) for p in content] if isinstance(content, list) else content


@dataclass(frozen=True)
class Location:
    """Where a record comes from: a JSONL file and line, or a datasets folder, split and row."""

    file: str
    line: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file} row {self.line}"


class RecordError(UserError):
    """One bad record: its location, its id when known, and what is wrong with it."""

    def __init__(self, loc: Location, reason: str, rid: str | None = None):
        self.loc, self.reason, self.rid = loc, reason, rid
        super().__init__(f"{loc}{f' (id {rid})' if rid else ''}: {reason}")


@dataclass
class Reject:
    """A record left out of a lenient read (or of preprocessing), and why."""

    file: str
    line: int | None
    id: str | None
    reason: str
    split: str | None = None

    @classmethod
    def of(cls, err: RecordError, split: str | None = None) -> Reject:
        return cls(err.loc.file, err.loc.line, err.rid, err.reason, split)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "file": self.file,
            "line": self.line,
            "split": self.split,
            "reason": self.reason,
        }

    def message(self) -> str:
        return f"{self.file}:{self.line}{f' (id {self.id})' if self.id else ''}: {self.reason}"


# ---------------------------------------------------------------------------------------------------------
# JSONL


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | RecordError]]:
    """Yield (line number, object) for each non-blank line, or (line number, RecordError) for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = Location(str(path), lineno)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, RecordError(loc, f"not valid UTF-8 (byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, RecordError(loc, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, RecordError(loc, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is a UserError."""
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            raise obj
        yield lineno, obj


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, keys in insertion order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# images


def resolve_image(root: Path, rel: Any, where: str) -> Path:
    """Resolve an image path inside the dataset root; reject absolute or escaping paths (symlinks too)."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{where}: image path must be a non-empty string")
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where}: image path '{rel}' resolves outside the dataset root {root}")
    if not path.is_file():
        raise UserError(f"{where}: image '{rel}' does not exist ({path})")
    return path


def check_image(path: Path, where: str) -> tuple[int, int]:
    """Decode an image fully; return its (width, height) or raise a UserError."""
    return _decoded_size(path, path, where)


def decoded_image_digest(path: Path, where: str) -> str:
    """sha256 of an image file's bytes, checked to decode fully (as `check_image`) from one read of the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # gone, unreadable: the same message as an image that does not decode
        raise UserError(f"{where}: image '{path}' cannot be decoded ({type(exc).__name__}: {exc})") from None
    _decoded_size(_NamedBytes(data, path), path, where)
    return hashlib.sha256(data).hexdigest()


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that PIL's errors name as it names a path (not a BytesIO at some address)."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return repr(str(self.path))


def _decoded_size(source, path: Path, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(source) as im:
            im.load()
            return im.size
    except Exception as exc:
        raise UserError(f"{where}: image '{path}' cannot be decoded ({type(exc).__name__}: {exc})") from None


def image_cache_dir() -> Path:
    """Folder holding images extracted from datasets with embedded bytes ($MOLE_CACHE_DIR/images)."""
    base = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mole-trainer"
    return Path(base) / "images"


def store_image_bytes(data: bytes, name_hint: str | None = None) -> Path:
    """Write image bytes once into the cache, named by their sha256 (the suffix from the hint)."""
    suffix = Path(name_hint).suffix.lower() if name_hint else ""
    if not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
        suffix = ".img"  # PIL identifies images by content, not by name
    folder = image_cache_dir()
    dest = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(dest, data)  # parallel readers never see half a file
    return dest


# ---------------------------------------------------------------------------------------------------------
# one record


ImageResolver = Callable[[Any, str], Path]


def record_kind(obj: dict, layout: ShareGPTLayout | AlpacaLayout | None = None) -> str:
    """'messages', 'sharegpt' or 'alpaca', from the layout given or else from the record's fields."""
    if isinstance(layout, AlpacaLayout):
        return "alpaca"
    if isinstance(layout, ShareGPTLayout) or ("conversations" in obj and "messages" not in obj):
        return "sharegpt"
    return "messages"


def parse_object(
    obj: dict,
    loc: Location,
    resolver: ImageResolver,
    decode: bool = True,
    default_id: str | None = None,
    layout: ShareGPTLayout | AlpacaLayout | None = None,
    request: bool = False,
) -> Sample:
    """Validate one record (messages, ShareGPT or alpaca form) into a Sample; a problem raises RecordError.

    `layout` gives LLaMA-Factory's column and tag names; `request` accepts a conversation ending
    with a user turn (an inference request: the model answers it).
    """
    # ShareGPT and LLaMA-Factory files often carry no id; the messages format requires one
    kind = record_kind(obj, layout)
    rid = obj.get("id", default_id if kind != "messages" else None)
    if not isinstance(rid, str) or not rid:
        raise RecordError(loc, "field 'id' must be a non-empty string")
    try:
        return _parse(obj, loc, rid, resolver, decode, layout, request)
    except RecordError:
        raise
    except UserError as exc:
        raise RecordError(loc, str(exc), rid) from None


def _parse(
    obj: dict,
    loc: Location,
    rid: str,
    resolver: ImageResolver,
    decode: bool,
    layout: ShareGPTLayout | AlpacaLayout | None,
    request: bool,
) -> Sample:
    kind = record_kind(obj, layout)
    if layout is not None:
        images_field = layout.images
        images = obj.get(images_field)
        system_key = layout.system
    else:
        if "images" in obj and "image" in obj:
            raise UserError("give either 'image' or 'images', not both")
        # one image may come as 'image' (LLaVA, many HF datasets), several as 'images'
        images_field = "image" if "image" in obj else "images"
        images = [obj["image"]] if images_field == "image" else obj.get("images")
        system_key = "system" if kind == "sharegpt" else None
    if kind == "alpaca":
        raw, roles = raw_alpaca(obj, layout), MESSAGE_ROLES
    elif kind == "sharegpt":
        lay = layout if isinstance(layout, ShareGPTLayout) else ShareGPTLayout()
        raw, roles = raw_sharegpt(obj, lay), lay.roles
    else:
        raw, roles = raw_messages(obj), MESSAGE_ROLES
    system_field = (system_key, obj[system_key]) if system_key and obj.get(system_key) is not None else None
    system, turns, per_turn = check_conversation(raw, roles, system_field, request)
    if not isinstance(images, list) or not images:
        raise UserError(f"field '{images_field}' must be a non-empty list of paths")
    instruction = router_request(turns)
    if not instruction.strip():
        raise UserError(f"the user turn{'s have' if len(per_turn) > 1 else ' has'} no instruction text")
    n_img = sum(n for _, n, _ in per_turn)
    if n_img != len(images):
        if len(per_turn) == 1:
            where, _, what = per_turn[0]
            held = f"{where} has {n_img} {what}"
        else:
            detail = ", ".join(f"{w}: {n} {what}" for w, n, what in per_turn)
            held = f"the user turns have {n_img} image(s) ({detail})"
        raise UserError(f"{held} but '{images_field}' lists {len(images)} image(s)")
    paths = [resolver(rel, f"{images_field}[{i}]") for i, rel in enumerate(images)]
    if decode:
        for i, p in enumerate(paths):
            check_image(p, f"{images_field}[{i}]")
    metadata = obj.get("metadata")
    if isinstance(metadata, str):  # a JSON string (how Arrow columns keep free-form objects)
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise UserError("field 'metadata' is a string that is not JSON") from None
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise UserError("field 'metadata' must be an object")
    expert = obj.get("expert")
    if expert is not None and not isinstance(expert, str):
        raise UserError("field 'expert' must be a string")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise UserError(f"field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    return Sample(
        id=rid,
        images=paths,
        instruction=instruction,
        answer=turns[-1]["content"] if turns[-1]["role"] == "assistant" else "",
        metadata=metadata,
        expert=expert,
        split=split,
        source=str(loc),
        file=loc.file,
        line=loc.line,
        system=system,
        turns=turns,
        image_field=images_field,
    )


def path_resolver(root: Path) -> ImageResolver:
    return lambda rel, where: resolve_image(root, rel, where)


def parse_record(
    obj: dict, path: Path, lineno: int, root: Path, decode: bool = True, request: bool = False
) -> Sample:
    """Validate one JSONL record (messages or ShareGPT form) and turn it into a Sample."""
    return parse_object(obj, Location(str(path), lineno), path_resolver(Path(root)), decode, request=request)


# ---------------------------------------------------------------------------------------------------------
# whole files and folders


def collect_records(
    items: Iterator[tuple[Location, dict | RecordError, str | None]],
    resolver: ImageResolver,
    decode: bool,
    strict: bool,
    split: str | None,
    layout: ShareGPTLayout | AlpacaLayout | None = None,
) -> tuple[list[Sample], list[Reject]]:
    samples: list[Sample] = []
    rejects: list[Reject] = []
    seen: dict[str, int] = {}
    for loc, obj, default_id in items:
        try:
            if isinstance(obj, RecordError):
                raise obj
            s = parse_object(obj, loc, resolver, decode, default_id, layout)
            if s.id in seen:
                raise RecordError(loc, f"duplicate id '{s.id}' (first at {loc.unit} {seen[s.id]})", s.id)
        except RecordError as err:
            if strict:
                raise
            rejects.append(Reject.of(err, split if split is not None else _split_of(obj)))
            continue
        seen[s.id] = loc.line
        samples.append(s)
    return samples, rejects


def _split_of(obj: Any) -> str | None:
    split = obj.get("split") if isinstance(obj, dict) else None
    return split if split in SPLITS else None


def read_jsonl_samples(
    path: str | Path,
    root: str | Path | None = None,
    decode: bool = True,
    strict: bool = True,
    split: str | None = None,
) -> tuple[list[Sample], list[Reject]]:
    """(samples, rejects) of one JSONL file; strict raises on the first bad record instead."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    stem = split or path.stem
    items = ((Location(str(path), n), obj, f"{stem}-{n}") for n, obj in iter_jsonl(path))
    return collect_records(items, path_resolver(root), decode, strict, split)


def load_jsonl_samples(path: str | Path, root: str | Path | None = None, decode: bool = True) -> list[Sample]:
    """Read and validate every record of one JSONL file (image paths relative to `root`)."""
    return read_jsonl_samples(path, root, decode)[0]
