"""Expert dataset format (messages JSONL + images) with strict validation.

A dataset is a folder holding train.jsonl / val.jsonl / test.jsonl and the images they name, one
record per line::

    {"id": "cal-0001", "images": ["images/cal-0001.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}],
     "metadata": {...}}

Image paths are relative to the dataset root and may not escape it. Every problem is reported as
a UserError naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import SPLITS


@dataclass
class Sample:
    """One validated record: a user turn with images and an instruction, and the assistant answer."""

    id: str
    images: list[Path]  # absolute paths
    instruction: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    expert: str | None = None
    split: str | None = None
    source: str = ""  # "file:line", for messages

    def messages(self, with_answer: bool = True) -> list[dict]:
        """The conversation in the chat-template form (images first, then the instruction)."""
        content: list[dict] = [{"type": "image"} for _ in self.images]
        content.append({"type": "text", "text": self.instruction})
        msgs = [{"role": "user", "content": content}]
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
        return msgs


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8, keys in insertion order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _text_of(content: Any, where: str) -> tuple[str, int]:
    """Text and number of image parts of a message content (a string or a list of parts)."""
    if isinstance(content, str):
        n = content.count("<image>")  # ShareGPT-style placeholders: the images come from 'images'
        return (content.replace("<image>", "").strip() if n else content), n
    if not isinstance(content, list):
        raise UserError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts, n_images = [], 0
    for i, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise UserError(f"{where}: content[{i}] must be an object with a 'type'")
        if part["type"] == "image":
            n_images += 1
        elif part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise UserError(f"{where}: content[{i}].text must be a string")
            texts.append(part["text"])
        else:
            raise UserError(f"{where}: content[{i}].type '{part['type']}' is not 'image' or 'text'")
    return "\n".join(texts), n_images


def resolve_image(root: Path, rel: Any, where: str) -> Path:
    """Resolve an image path inside the dataset root; reject absolute or escaping paths."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{where}: image path must be a non-empty string")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where}: image path '{rel}' resolves outside the dataset root {root}")
    if not path.is_file():
        raise UserError(f"{where}: image '{rel}' does not exist ({path})")
    return path


def check_image(path: Path, where: str) -> tuple[int, int]:
    """Decode an image fully; return its (width, height) or raise a UserError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as exc:
        raise UserError(f"{where}: image '{path}' cannot be decoded ({type(exc).__name__}: {exc})") from None


def parse_record(obj: dict, path: Path, lineno: int, root: Path, decode: bool = True) -> Sample:
    """Validate one messages-format record and turn it into a Sample."""
    where = f"{path}:{lineno}"
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise UserError(f"{where}: field 'id' must be a non-empty string")
    where = f"{path}:{lineno} (id {rid})"
    images = obj.get("images")
    if not isinstance(images, list) or not images:
        raise UserError(f"{where}: field 'images' must be a non-empty list of paths")
    messages = obj.get("messages")
    if not isinstance(messages, list) or len(messages) != 2:
        raise UserError(
            f"{where}: field 'messages' must be a list of exactly two turns, the user request and the "
            f"assistant answer (got {len(messages) if isinstance(messages, list) else type(messages).__name__})"
        )
    user, assistant = messages[0], messages[-1]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    if user["role"] != "user":
        raise UserError(f"{where}: messages[0].role must be 'user', got '{user['role']}'")
    if assistant["role"] != "assistant":
        raise UserError(
            f"{where}: the last message must be the assistant answer, got role '{assistant['role']}'"
        )
    instruction, n_img = _text_of(user["content"], f"{where}: messages[0]")
    answer, _ = _text_of(assistant["content"], f"{where}: messages[-1]")
    if not instruction.strip():
        raise UserError(f"{where}: the user turn has no instruction text")
    if not answer.strip():
        raise UserError(f"{where}: the assistant answer is empty")
    if n_img != len(images):
        raise UserError(f"{where}: the user turn has {n_img} image part(s) but 'images' lists {len(images)}")
    paths = [resolve_image(root, rel, f"{where}: images[{i}]") for i, rel in enumerate(images)]
    if decode:
        for i, p in enumerate(paths):
            check_image(p, f"{where}: images[{i}]")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError(f"{where}: field 'metadata' must be an object")
    expert = obj.get("expert")
    if expert is not None and not isinstance(expert, str):
        raise UserError(f"{where}: field 'expert' must be a string")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise UserError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    return Sample(
        id=rid,
        images=paths,
        instruction=instruction,
        answer=answer,
        metadata=metadata,
        expert=expert,
        split=split,
        source=f"{path}:{lineno}",
    )


def load_jsonl_samples(path: str | Path, root: str | Path | None = None, decode: bool = True) -> list[Sample]:
    """Read and validate every record of one JSONL file (image paths relative to `root`)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    samples, seen = [], {}
    for lineno, obj in read_jsonl(path):
        s = parse_record(obj, path, lineno, root, decode=decode)
        if s.id in seen:
            raise UserError(f"{path}:{lineno}: duplicate id '{s.id}' (first at line {seen[s.id]})")
        seen[s.id] = lineno
        samples.append(s)
    return samples


def load_expert_dataset(root: str | Path, decode: bool = True) -> dict[str, list[Sample]]:
    """Load train/val/test of one expert dataset folder; missing split files are empty splits."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    out = {}
    for split in SPLITS:
        f = root / f"{split}.jsonl"
        out[split] = load_jsonl_samples(f, root, decode=decode) if f.is_file() else []
    if not any(out.values()):
        raise UserError(
            f"{root}: no records (expected train.jsonl / val.jsonl / test.jsonl with at least one line)"
        )
    return out


def sample_to_record(s: Sample, image_paths: list[str]) -> dict:
    """Messages-format record of a Sample, with the given (relative) image paths."""
    rec: dict[str, Any] = {"id": s.id, "images": image_paths}
    if s.expert is not None:
        rec["expert"] = s.expert
    if s.split is not None:
        rec["split"] = s.split
    rec["messages"] = [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in image_paths), {"type": "text", "text": s.instruction}],
        },
        {"role": "assistant", "content": s.answer},
    ]
    rec["metadata"] = s.metadata
    return rec
