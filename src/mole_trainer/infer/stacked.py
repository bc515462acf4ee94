"""Requests for stacked inference (`mole infer`): one on the command line, or a JSONL file, and results.

The engine that answers them is infer/engine.py. A request file is the user's own: its images may
be named by absolute path or relative to the file's folder (the dataset-root rule is for datasets).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.records import Sample
from ..errors import UserError


def request_sample(image: str, prompt: str, rid: str = "request") -> Sample:
    """A Sample for one request given on the command line."""
    from ..data.records import check_image

    p = Path(image)
    if not p.is_file():
        raise UserError(f"{image}: image not found")
    check_image(p, image)
    if not prompt.strip():
        raise UserError("--prompt is empty")
    return Sample(id=rid, images=[p.resolve()], instruction=prompt, answer="", source=str(image))


def request_image(root: Path, name, where: str) -> Path:
    """An image of a request file: an absolute path, or a path relative to the file's folder."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: image path must be a non-empty string")
    path = (Path(root) / name).resolve()  # an absolute name stays itself
    if not path.is_file():
        raise UserError(f"{where}: image '{name}' does not exist ({path})")
    return path


def requests_from_jsonl(path: str | Path) -> list[Sample]:
    """Requests from JSONL, one per line, image paths absolute or relative to the file's folder:

    - `{"id", "image" | "images", "prompt", "system"?}`: one user turn, images first;
    - a messages-format record (`messages`, `images`): an optional system prompt and any history,
      ending with the user turn to answer (or with an assistant turn, which is left out and
      answered again);
    - a ShareGPT record (`conversations`, `image` | `images`, `system`?), the same way.

    The router sees every request the way it saw its training records (data.conversation.router_request).
    """
    from ..data.records import Location, check_image, parse_object, read_jsonl

    path = Path(path)
    root = path.parent
    samples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in obj or "conversations" in obj:
            rec = obj if "id" in obj else {**obj, "id": f"line-{lineno}"}
            resolve = lambda name, where: request_image(root, name, where)  # noqa: E731
            samples.append(parse_object(rec, Location(str(path), lineno), resolve, request=True))
            continue
        images = obj.get("images", [obj["image"]] if "image" in obj else None)
        prompt = obj.get("prompt")
        system = obj.get("system")
        if not isinstance(images, list) or not images:
            raise UserError(f"{where}: a request needs 'image' (a path) or 'images' (a list of paths)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: a request needs a non-empty 'prompt' string")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise UserError(f"{where}: 'system' must be a non-empty string when given")
        paths = [request_image(root, name, f"{where}: image") for name in images]
        for p in paths:
            check_image(p, where)
        rid = obj.get("id", f"line-{lineno}")
        samples.append(
            Sample(id=str(rid), images=paths, instruction=prompt, answer="", source=where, system=system)
        )
    if not samples:
        raise UserError(f"{path}: no requests")
    return samples


def write_results(results: list[dict], path: str | Path) -> None:
    """Write results as JSONL."""
    with Path(path).open("w") as fh:
        for r in results:
            fh.write(json.dumps(r) + "\n")


class ResultWriter:
    """Results appended to a JSONL file one line at a time, flushed as each arrives."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.path.open("w")

    def write(self, result: dict) -> None:
        """Append one result line and flush it to the file."""
        self.fh.write(json.dumps(result) + "\n")
        self.fh.flush()

    def close(self) -> None:
        """Close the file."""
        self.fh.close()
