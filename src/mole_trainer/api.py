"""Python API over the inference engine: `from mole_trainer import MoLE`.

    mole = MoLE.from_deployment("s3://bucket/deploy", device="cuda")
    mole.route("screen.png", "What is on Monday?")  # {"expert", "probability", "probs", "top_k"}
    mole.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": "What is on Monday?"}]}])

The same engine answers `mole infer` and `mole serve`; here one call is one request. Messages are
parsed by the server's parser (serve/messages.py): the same messages are accepted, with the same
errors (raised as UserError). Unlike the server, an image URL here may also be a PIL image, a
`pathlib.Path` or a local path anywhere: the files are the caller's own, read in its own process.
"""

from __future__ import annotations

from typing import Any

from .data.records import Sample
from .errors import UserError
from .serve.errors import ApiError
from .serve.messages import ROUTED_MODEL, Limits, load_image, parse_messages

# the server's limits (images per request, pixels per image), plus the caller's own images and files
API_LIMITS = Limits(caller_images=True)


def messages_to_sample(messages: list[dict], rid: str = "request") -> Sample:
    """An OpenAI-style conversation as a Sample, parsed as `mole serve` parses it (serve/messages.py);
    image URLs may also be PIL images or local paths. A bad message raises UserError naming the field."""
    try:
        return parse_messages(messages, API_LIMITS, rid)
    except ApiError as exc:
        raise UserError(exc.message) from None


def _image(ref: Any, where: str):
    try:
        return load_image(ref, where, API_LIMITS)
    except ApiError as exc:
        raise UserError(exc.message) from None


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
        pics = [_image(im, f"images[{i}]") for i, im in enumerate(images)]
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError("instruction must be a non-empty string")
        p = self.engine.route([Sample(id="route", images=pics, instruction=instruction, answer="")])[0]
        probs = {n: round(float(x), 6) for n, x in zip(self.engine.names, p, strict=True)}
        top = sorted(probs.items(), key=lambda kv: -kv[1])
        return {"expert": top[0][0], "probability": top[0][1], "probs": probs, "top_k": top[:TOP_K]}

    def chat(
        self,
        messages: list[dict],
        model: str = ROUTED_MODEL,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> dict:
        """Answer an OpenAI-style conversation: `model="mole"` routes, an expert name forces it.

        `messages` are what `mole serve` accepts (system or developer first, then user and assistant
        turns ending with the user's; user content a string or text and image_url parts), and a bad
        one raises the server's error as UserError. Image URLs may also be PIL images or local paths
        (anywhere: unlike the server there is no --allow-files folder, the files are the caller's own).

        Returns {"output", "finish_reason", "usage": {prompt_tokens, completion_tokens, total_tokens},
        "mole": {expert, probability, top_k, probs, forced, fallback, routed, timings}}.
        """
        from .infer.engine import Request

        sample = messages_to_sample(messages)
        req = Request(
            sample,
            expert=None if model == ROUTED_MODEL else model,
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
