"""Synthetic GUI expert datasets (calendar, login window, chart screen, OCR) for the demo and tests.

Every record draws its own screen from a random generator seeded by (seed, expert, split, index), so the
same arguments give byte-identical JSONL and PNG files, and no two records share an image. Answers give
coordinates scaled to 0-1000 of the image width and height (integers); the metadata keeps what the
answer was derived from: pixel boxes [x0, y0, x1, y1], values and texts.

Answer formats per task:
  click     click(x=512, y=604)
  action    click(x=.., y=..)  or  type(x=.., y=.., text="jdoe")
  chart_qa  a series name or an integer, as text
  ocr       the text lines joined with newlines
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

from ...errors import UserError
from ...layout import SPLITS
from ..records import write_jsonl
from .calendar_screen import _calendar_screen
from .chart_screen import _chart_screen
from .common import _rng, _Screen
from .login_window import _login_screen
from .ocr_screen import _ocr_screen

SYNTH_EXPERTS: tuple[str, ...] = ("calendar", "login-window", "chart-screen", "ocr")
DEFAULT_COUNTS = {"train": 120, "val": 16, "test": 32}
DEFAULT_IMAGE_SIZE = (448, 336)  # width, height
MIN_IMAGE_SIZE = (320, 240)


def synthesize(
    out_dir: str | Path,
    experts: Iterable[str] = SYNTH_EXPERTS,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
) -> dict[str, dict[str, int]]:
    """Write synthetic expert datasets under out_dir/<expert>/ and return {expert: {split: n}}.

    Each expert folder gets train/val/test.jsonl (messages format, see formats.py) and images/<id>.png.
    `counts` maps split -> number of records (default DEFAULT_COUNTS); a split it leaves out gets an empty
    file. The same arguments always produce byte-identical files.
    """
    experts = (experts,) if isinstance(experts, str) else tuple(experts)
    unknown = [e for e in experts if e not in _GENERATORS]
    if unknown:
        raise UserError(
            f"unknown synthetic expert(s) {', '.join(unknown)}; valid: {', '.join(SYNTH_EXPERTS)}"
        )
    counts = _check_counts(DEFAULT_COUNTS if counts is None else counts)
    size = _check_size(image_size)
    return {e: _write_expert(Path(out_dir) / e, e, counts, seed, size) for e in experts}


def _check_counts(counts: dict[str, int]) -> dict[str, int]:
    bad = [s for s in counts if s not in SPLITS]
    if bad:
        raise UserError(f"counts: unknown split(s) {', '.join(bad)}; valid: {', '.join(SPLITS)}")
    for split, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UserError(f"counts: {split} must be a non-negative integer, got {n!r}")
    return {s: counts.get(s, 0) for s in SPLITS}


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    w, h = (int(v) for v in image_size)
    if w < MIN_IMAGE_SIZE[0] or h < MIN_IMAGE_SIZE[1]:
        raise UserError(
            f"image_size {w}x{h} is too small; the minimum is {MIN_IMAGE_SIZE[0]}x{MIN_IMAGE_SIZE[1]}"
        )
    return w, h


def _write_expert(root: Path, expert: str, counts: dict[str, int], seed: int, size: tuple[int, int]) -> dict:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        records = [_make_record(root, expert, split, i, seed, size) for i in range(counts[split])]
        write_jsonl(root / f"{split}.jsonl", records)
    return dict(counts)


def _make_record(root: Path, expert: str, split: str, index: int, seed: int, size: tuple[int, int]) -> dict:
    task, generate = _GENERATORS[expert]
    screen = generate(_rng(seed, expert, split, index), size)
    rid = f"{expert}-{split}-{index:05d}"
    rel = f"images/{rid}.png"
    screen.image.save(root / rel, format="PNG")
    return {
        "id": rid,
        "images": [rel],
        "expert": expert,
        "split": split,
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": screen.instruction}]},
            {"role": "assistant", "content": screen.answer},
        ],
        "metadata": {"expert": expert, "task": task, **screen.metadata},
    }


# expert -> (task, screen generator); the names come from SYNTH_EXPERTS only
_GENERATORS: dict[str, tuple[str, Callable[[random.Random, tuple[int, int]], _Screen]]] = dict(
    zip(
        SYNTH_EXPERTS,
        (
            ("click", _calendar_screen),
            ("action", _login_screen),
            ("chart_qa", _chart_screen),
            ("ocr", _ocr_screen),
        ),
        strict=True,
    )
)
SYNTH_TASKS: dict[str, str] = {expert: task for expert, (task, _) in _GENERATORS.items()}
