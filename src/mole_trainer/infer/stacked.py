"""Stacked inference from a deployment: route each request, then generate with the chosen expert.

The base is loaded once with the router and every expert attached as named PEFT adapters.
Requests are routed together (label scoring), then grouped by expert: each group is generated in
batches with its adapter active, and results come back in request order.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter_info import check_same_base, read_adapter_info
from ..data.formats import Sample
from ..errors import UserError
from ..router_prompt import label_names

ROUTER_ADAPTER = "router"


def expert_adapter(name: str) -> str:
    """PEFT adapter name of an expert (prefixed so no expert can clash with the router)."""
    return f"expert_{name}"


class StackedModel:
    """Base + router + experts, loaded from a deployment folder or URL."""

    def __init__(
        self,
        deployment: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | None = None,
        base_model: str | None = None,
    ):
        """Load a deployment; `base_model` replaces the recorded base (e.g. a deployment moved to
        another machine, where the base lives at another path or under its hub id)."""
        from peft import PeftModel

        from ..deploy import load_deployment
        from ..model.loading import load_base, load_processor

        dep = load_deployment(deployment, cache_dir=cache_dir)
        self.label_map = dep["label_map"]
        self.names = label_names(self.label_map)
        router_info = read_adapter_info(dep["router"], "router")
        self.base_model = base_model or router_info["base_model"]
        base = load_base(self.base_model, dtype, device)
        self.model = PeftModel.from_pretrained(base, dep["router"], adapter_name=ROUTER_ADAPTER).eval()
        self.processors = {}
        self.router_processor = self._processor(router_info, load_processor)
        self.expert_processor, self.max_new_tokens = {}, {}
        for name in self.names:
            path = dep["experts"][name]
            info = read_adapter_info(path, "expert")
            check_same_base(info, router_info, path)
            self.model.load_adapter(path, adapter_name=expert_adapter(name))
            self.expert_processor[name] = self._processor(info, load_processor)
            self.max_new_tokens[name] = info["max_new_tokens"]
        self.model.eval()

    def _processor(self, info: dict, load_processor):
        key = (self.base_model, info["min_pixels"], info["max_pixels"])
        if key not in self.processors:
            self.processors[key] = load_processor(*key)
        return self.processors[key]

    def route(self, samples: list[Sample], batch_size: int = 8):
        """Routing distribution [n, K] for samples."""
        from .scoring import route_probs

        self.model.set_adapter(ROUTER_ADAPTER)
        return route_probs(self.model, self.router_processor, samples, self.names, batch_size)

    def __call__(
        self,
        samples: list[Sample],
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        expert: str | None = None,
    ) -> list[dict]:
        """Route (unless `expert` forces one) and generate; one result dict per sample, in order."""
        from .generate import generate

        if expert is not None and expert not in self.label_map:
            raise UserError(f"unknown expert '{expert}' (deployed: {', '.join(self.names)})")
        probs = self.route(samples, batch_size) if expert is None else None
        results: list[dict] = []
        for i, _ in enumerate(samples):
            if probs is None:
                results.append({"expert": expert, "probability": None, "probs": None, "forced": True})
            else:
                k = int(probs[i].argmax())
                results.append(
                    {
                        "expert": self.names[k],
                        "probability": round(float(probs[i, k]), 6),
                        "probs": {n: round(float(p), 6) for n, p in zip(self.names, probs[i], strict=True)},
                    }
                )
        for name in self.names:
            idx = [i for i, r in enumerate(results) if r["expert"] == name]
            if not idx:
                continue
            self.model.set_adapter(expert_adapter(name))
            outs = generate(
                self.model,
                self.expert_processor[name],
                [samples[i] for i in idx],
                max_new_tokens or self.max_new_tokens[name],
                batch_size,
            )
            for i, text in zip(idx, outs, strict=True):
                results[i]["output"] = text
        for s, r in zip(samples, results, strict=True):
            r["id"] = s.id
        return results


def request_sample(image: str, prompt: str, rid: str = "request") -> Sample:
    """A Sample for one request given on the command line."""
    from ..data.formats import check_image

    p = Path(image)
    if not p.is_file():
        raise UserError(f"{image}: image not found")
    check_image(p, image)
    if not prompt.strip():
        raise UserError("--prompt is empty")
    return Sample(id=rid, images=[p.resolve()], instruction=prompt, answer="", source=str(image))


def requests_from_jsonl(path: str | Path) -> list[Sample]:
    """Requests from JSONL, one per line, image paths relative to the file's folder:

    - `{"id", "image" | "images", "prompt", "system"?}`: one user turn, images first;
    - a messages-format record (`messages`, `images`): an optional system prompt and any history,
      ending with the user turn to answer (or with an assistant turn, which is left out and
      answered again);
    - a ShareGPT record (`conversations`, `image` | `images`, `system`?), the same way.

    The router sees every request the way it saw its training records (data.conversation.router_request).
    """
    from ..data.formats import check_image, parse_record, read_jsonl, resolve_image

    path = Path(path)
    root = path.parent
    samples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in obj or "conversations" in obj:
            rec = obj if "id" in obj else {**obj, "id": f"line-{lineno}"}
            samples.append(parse_record(rec, path, lineno, root, request=True))
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
        paths = [resolve_image(root, rel, f"{where}: image") for rel in images]
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
