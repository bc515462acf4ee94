"""Python API over the inference engine: `from mole_trainer import MoLE`.

    mole = MoLE.from_deployment("s3://bucket/deploy", device="cuda")
    mole.route("screen.png", "What is on Monday?")  # {"expert", "probability", "probs", "top_k"}
    mole.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": "What is on Monday?"}]}])

The same engine answers `mole infer` and `mole serve`; here one call is one request.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from .data.conversation import router_request
from .data.formats import Sample
from .errors import UserError

MOLE_MODEL = "mole"  # the model name that routes; any expert name (or "base") forces that expert


def load_image(ref: Any, where: str = "image"):
    """A PIL image from a PIL image, a path, or a `data:` URL with base64 bytes."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, Path) or (isinstance(ref, str) and not ref.startswith("data:")):
        path = Path(ref)
        if not path.is_file():
            raise UserError(f"{where}: image file '{ref}' not found")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:
            raise UserError(f"{where}: '{ref}' is not an image ({exc})") from None
    if isinstance(ref, str):
        head, _, data = ref.partition(",")
        if ";base64" not in head:
            raise UserError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: the data: URL is not valid base64") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                return im.convert("RGB")
        except Exception as exc:
            raise UserError(f"{where}: the data: URL bytes are not an image ({exc})") from None
    raise UserError(f"{where}: expected a path, a PIL image or a data: URL, got {type(ref).__name__}")


def _image_ref(part: dict, where: str):
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return part.get("image")


def messages_to_sample(messages: list[dict], rid: str = "request") -> Sample:
    """An OpenAI-style conversation (system?, then user/assistant turns ending with a user turn) as a Sample.

    User content: a string, or parts `{"type": "text", "text"}`, `{"type": "image_url", "image_url":
    {"url"}}` or `{"type": "image", "image"}` (a path, a PIL image or a data: URL).
    A minimal conversion for the Python API; the server validates requests more strictly.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list")
    system, turns, images = None, [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: expected a dict with role system, user or assistant")
        content = m.get("content")
        if m["role"] == "system":
            if i != 0:
                raise UserError(f"{where}: the system message must come first")
            system = _text_only(content, where)
        elif m["role"] == "assistant":
            turns.append({"role": "assistant", "content": _text_only(content, where)})
        else:
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                raise UserError(f"{where}: content must be a string or a non-empty list of parts")
            out = []
            for j, part in enumerate(parts):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    out.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "image"):
                    images.append(load_image(_image_ref(part, pw), pw))
                    out.append({"type": "image"})
                else:
                    raise UserError(f"{pw}: expected a text, image_url or image part")
            turns.append({"role": "user", "content": out})
    if not turns or turns[-1]["role"] != "user":
        raise UserError("messages must end with a user turn")
    instruction = router_request(turns)
    if not instruction.strip():
        raise UserError("the user turns have no text")
    return Sample(
        id=rid, images=images, instruction=instruction, answer="", system=system, turns=turns, source=rid
    )


def _text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise UserError(f"{where}: content must be text")


class MoLE:
    """A deployment ready to route and answer (one engine; see infer/engine.py)."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def from_deployment(cls, url: str, **engine_kwargs) -> MoLE:
        """Load a deployment (folder or fsspec URL); keyword arguments go to Engine (device, dtype,
        base_model, cache_dir, min_probability, fallback)."""
        from .infer.engine import Engine

        return cls(Engine(url, **engine_kwargs))

    @property
    def names(self) -> list[str]:
        """Expert names in label order."""
        return list(self.engine.names)

    def route(self, images, instruction: str) -> dict:
        """Where the router sends a request: {"expert", "probability", "probs", "top_k"}.

        `images`: one image or a list (paths, PIL images or data: URLs).
        """
        from .infer.engine import TOP_K

        images = images if isinstance(images, list | tuple) else [images]
        pics = [load_image(im, f"images[{i}]") for i, im in enumerate(images)]
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError("instruction must be a non-empty string")
        p = self.engine.route([Sample(id="route", images=pics, instruction=instruction, answer="")])[0]
        probs = {n: round(float(x), 6) for n, x in zip(self.engine.names, p, strict=True)}
        top = sorted(probs.items(), key=lambda kv: -kv[1])
        return {"expert": top[0][0], "probability": top[0][1], "probs": probs, "top_k": top[:TOP_K]}

    def chat(
        self,
        messages: list[dict],
        model: str = MOLE_MODEL,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> dict:
        """Answer an OpenAI-style conversation: `model="mole"` routes, an expert name forces it.

        Returns {"output", "finish_reason", "usage": {prompt_tokens, completion_tokens, total_tokens},
        "mole": {expert, probability, top_k, probs, forced, fallback, routed, timings}}.
        """
        from .infer.engine import Request

        sample = messages_to_sample(messages)
        req = Request(
            sample,
            expert=None if model == MOLE_MODEL else model,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        res = self.engine.run([req])[0].to_dict()
        usage = {
            "prompt_tokens": res["prompt_tokens"],
            "completion_tokens": res["completion_tokens"],
            "total_tokens": res["prompt_tokens"] + res["completion_tokens"],
        }
        info = {
            k: res[k]
            for k in ("expert", "probability", "top_k", "probs", "forced", "fallback", "routed", "timings")
        }
        return {"output": res["output"], "finish_reason": res["finish_reason"], "usage": usage, "mole": info}
