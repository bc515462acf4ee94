"""Routing consistency: does the router pick the same expert for the same request when only things
that should not matter change?

- batch invariance: each record routed alone (no other requests in its batch) against in a batch;
- benign perturbations: JPEG re-encoding, a 10 % downscale, +10 % brightness, and three of the
  instruction: its final punctuation toggled ("Read it." <-> "Read it"), lower case ("read it."),
  and a polite prefix ("Please read it.", "Could you tell me which bar is highest?"; see
  data/rewrites.py). Whitespace is not among them: the router prompt canonicalises it, so that
  rate would be 1 by construction. It canonicalises case too (router_prompt.canonical_request), so
  lower case measures 1 unless that breaks; it stays in the report as that check.
Each rate is the fraction of records whose top-1 expert is unchanged.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..data.records import Sample
from ..data.rewrites import politely, toggle_final_mark


def _jpeg(im, path: Path):
    im.convert("RGB").save(path.with_suffix(".jpg"), quality=90)
    return path.with_suffix(".jpg")


def _resize(im, path: Path):
    w, h = im.size
    im.resize((max(1, round(w * 0.9)), max(1, round(h * 0.9)))).save(path)
    return path


def _brightness(im, path: Path):
    from PIL import ImageEnhance

    ImageEnhance.Brightness(im.convert("RGB")).enhance(1.1).save(path)
    return path


IMAGE_PERTURBATIONS: dict[str, Callable] = {"jpeg": _jpeg, "resize": _resize, "brightness": _brightness}
TEXT_PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "punctuation": toggle_final_mark,
    "lower-case": str.lower,
    "polite-prefix": politely,
}


def perturbed(sample: Sample, name: str, folder: Path) -> Sample:
    """A copy of the sample with one perturbation applied (images written under `folder`)."""
    from PIL import Image

    if name in TEXT_PERTURBATIONS:
        return replace(sample, instruction=TEXT_PERTURBATIONS[name](sample.instruction))
    images = []
    for i, p in enumerate(sample.images):
        with Image.open(p) as im:
            key = hashlib.sha256(f"{sample.id}/{i}".encode()).hexdigest()[:16]
            target = folder / f"{name}-{key}.png"
            images.append(IMAGE_PERTURBATIONS[name](im, target))
    return replace(sample, images=images)


def consistency_report(route: Callable, samples: list[Sample], predicted: list[int], batch_size: int) -> dict:
    """Agreement rates with `predicted` (the batched top-1 routes); `route(samples, bs)` -> probs."""
    alone = [int(route([s], 1)[0].argmax()) for s in samples]
    report = {"batch_invariance": _rate(alone, predicted), "perturbations": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [*IMAGE_PERTURBATIONS, *TEXT_PERTURBATIONS]:
            changed = [perturbed(s, name, Path(tmp)) for s in samples]
            routes = route(changed, batch_size).argmax(-1).tolist()
            report["perturbations"][name] = _rate(routes, predicted)
    rates = list(report["perturbations"].values())
    report["perturbation_mean"] = round(sum(rates) / len(rates), 4)
    return report


def _rate(a: list[int], b: list[int]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / max(len(b), 1), 4)
