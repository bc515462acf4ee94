"""OCR expert: transcribe a text block, a receipt or a note."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..ocr import OCR_PROMPT
from .common import (
    RGB,
    Box,
    _font,
    _grey,
    _hsv,
    _place,
    _Screen,
    _shift,
    _text_w,
    _union,
)

_WORDS = (
    "apple", "river", "green", "window", "coffee", "market", "silver", "garden", "paper", "yellow",
    "morning", "table", "station", "winter", "bright", "letter", "orange", "bridge", "quiet", "summer",
    "little", "office", "travel", "number", "friend", "basket", "planet", "rocket", "cloud", "meeting",
    "forest", "button", "candle", "pocket", "ticket", "spring", "simple", "family", "wooden", "stone",
    "north", "light", "music", "dinner", "print", "phone", "guitar", "sunset", "report", "monday",
    "friday", "street", "train", "delta", "harbor", "pencil", "camera", "stair", "blue", "fresh",
    "call", "buy", "send", "check", "bring", "meet", "read", "plan", "book", "order",
    "the", "a", "and", "for", "with", "at", "on", "to", "before", "after",
)  # fmt: skip
_ITEMS = (
    "Coffee", "Bagel", "Tea", "Muffin", "Sandwich", "Salad", "Juice", "Soup", "Cookie", "Water", "Bread", "Milk",
)  # fmt: skip
_SHOPS = ("CORNER MARKET", "CITY CAFE", "GREEN GROCER", "BOOK NOOK", "FRESH BAKERY", "DAILY DELI")
_NOTE_TITLES = ("Note", "To do", "Reminder", "Remember:", "Shopping list")

_OCR_PROMPTS = (
    OCR_PROMPT,  # the prompt of `mole data ocr-crops`, so crops and whole screens share it
    "Transcribe all the text you can see.",
    "What is written here? Give every line.",
    "Copy the text from the image, line by line.",
    "OCR this image.",
)
_OCR_KIND_PROMPTS = {
    "text": ("Read this paragraph.", "Transcribe the text block."),
    "receipt": ("Transcribe this receipt.", "Read the receipt line by line."),
    "note": ("What does the note say?", "Read the sticky note."),
}


@dataclass
class _Line:
    """One text line: a left part and an optional right-aligned part (receipt prices)."""

    left: str
    right: str = ""
    centred: bool = False

    @property
    def text(self) -> str:
        return f"{self.left} {self.right}" if self.right else self.left

    def width(self, font) -> int:
        return _text_w(font, self.left) + (_text_w(font, self.right) + 24 if self.right else 0)


def _word_line(rng: random.Random, font, max_w: int, n_words: int) -> str:
    """Random words up to n_words that fit in max_w pixels (at least one word)."""
    words = [rng.choice(_WORDS).capitalize()]
    while len(words) < n_words:
        word = rng.choice(_WORDS)
        if _text_w(font, " ".join([*words, word])) > max_w:
            break
        words.append(word)
    return " ".join(words)


def _receipt_lines(rng: random.Random, font, max_w: int) -> list[_Line]:
    lines = [_Line(rng.choice(_SHOPS), centred=True)] if rng.random() < 0.7 else []
    cents = []
    for item in rng.sample(_ITEMS, rng.randint(1, 4)):
        cents.append(rng.randint(50, 1500))
        lines.append(_Line(item, f"{cents[-1] / 100:.2f}"))
    lines.append(_Line(rng.choice(("TOTAL", "Total", "Total:")), f"{sum(cents) / 100:.2f}"))
    return lines


def _note_lines(rng: random.Random, font, max_w: int) -> list[_Line]:
    lines = [_Line(rng.choice(_NOTE_TITLES))] if rng.random() < 0.6 else []
    prefix = rng.choice(("", "- "))
    n = rng.randint(2 - len(lines), 6 - len(lines))
    return lines + [_Line(prefix + _word_line(rng, font, max_w - 20, rng.randint(2, 4))) for _ in range(n)]


def _text_lines(rng: random.Random, font, max_w: int) -> list[_Line]:
    end = rng.choice(("", "."))
    return [
        _Line(_word_line(rng, font, max_w - 8, rng.randint(2, 7)) + end) for _ in range(rng.randint(2, 6))
    ]


_OCR_KINDS = {"text": _text_lines, "receipt": _receipt_lines, "note": _note_lines}


def _ocr_screen(rng: random.Random, size: tuple[int, int]) -> _Screen:
    w, h = size
    plain = rng.random() < 0.4
    bg = (
        _grey(rng.randint(240, 255))
        if plain
        else _hsv(rng.random(), rng.uniform(0.05, 0.25), rng.uniform(0.88, 1.0))
    )
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(sorted(_OCR_KINDS))
    font = _font(rng.randint(11, 20))
    ink = (
        _grey(rng.randint(10, 70))
        if rng.random() < 0.7
        else _hsv(rng.random(), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.35))
    )
    paper_pad = rng.randint(10, 20) if kind != "text" else 0
    lines = _OCR_KINDS[kind](rng, font, w - 24 - 2 * paper_pad)
    line_h = int(font.size) + rng.randint(3, 8)
    block_w = max(ln.width(font) for ln in lines) + rng.randint(0, 30)
    block_w = min(block_w, w - 24 - 2 * paper_pad)
    block_h = line_h * len(lines)
    x0, y0 = _place(rng, (12, 12, w - 12, h - 12), block_w + 2 * paper_pad, block_h + 2 * paper_pad)
    if kind != "text":
        paper = _paper_colour(rng, kind)
        sheet = (x0, y0, x0 + block_w + 2 * paper_pad, y0 + block_h + 2 * paper_pad)
        draw.rectangle(_shift(sheet, 2, 2), fill=_grey(170))
        draw.rectangle(sheet, fill=paper)
    boxes = [
        _draw_line(draw, ln, (x0 + paper_pad, y0 + paper_pad + i * line_h), block_w, font, ink)
        for i, ln in enumerate(lines)
    ]
    prompts = _OCR_PROMPTS + _OCR_KIND_PROMPTS[kind]
    texts = [ln.text for ln in lines]
    meta = {"kind": kind, "lines": texts, "boxes": [list(b) for b in boxes], "font_size": int(font.size)}
    return _Screen(img, rng.choice(prompts), "\n".join(texts), meta)


def _paper_colour(rng: random.Random, kind: str) -> RGB:
    if kind == "note":
        return _hsv(rng.choice((0.15, 0.95, 0.33, 0.55)), rng.uniform(0.25, 0.45), 1.0)
    return _grey(rng.randint(248, 255))


def _draw_line(draw, line: _Line, origin: tuple[int, int], block_w: int, font, ink: RGB) -> Box:
    """Draw one line; return its ink box in pixels (the union of both parts for a receipt line)."""
    x, y = origin
    if line.centred:
        xy, anchor = (x + block_w / 2, y), "ma"
    else:
        xy, anchor = (x, y), "la"
    draw.text(xy, line.left, font=font, fill=ink, anchor=anchor)
    box = draw.textbbox(xy, line.left, font=font, anchor=anchor)
    if line.right:
        right_xy = (x + block_w, y)
        draw.text(right_xy, line.right, font=font, fill=ink, anchor="ra")
        box = _union(box, draw.textbbox(right_xy, line.right, font=font, anchor="ra"))
    return tuple(int(v) for v in box)
