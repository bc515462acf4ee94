"""What the synthetic experts share: the drawn screen, the per-record random generator, fonts, colours,
boxes, window themes, and the desktop the apps are drawn on."""

from __future__ import annotations

import colorsys
import hashlib
import math
import random
from dataclasses import dataclass
from functools import cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]


@dataclass
class _Screen:
    """One generated example before it is written: the image, the request, the answer and its sources."""

    image: Image.Image
    instruction: str
    answer: str
    metadata: dict[str, Any]


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator of its own per record: a hash of the parts, independent of PYTHONHASHSEED."""
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_w(font: ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(font.getlength(text))


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _grey(v: int) -> RGB:
    v = max(0, min(255, v))
    return v, v, v


def _center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _to_1000(x: float, y: float, size: tuple[int, int]) -> tuple[int, int]:
    return round(x * 1000 / size[0]), round(y * 1000 / size[1])


def _shift(box: Box, dx: int, dy: int) -> Box:
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


@dataclass(frozen=True)
class _Theme:
    bg: RGB
    fg: RGB
    muted: RGB
    border: RGB
    field: RGB
    accent: RGB
    title_bg: RGB
    title_fg: RGB


def _theme(rng: random.Random) -> _Theme:
    """A light or dark window theme with a random accent colour (white text stays readable on it)."""
    accent = _hsv(rng.random(), rng.uniform(0.55, 0.9), rng.uniform(0.5, 0.72))
    accent_title = rng.random() < 0.35
    if rng.random() < 0.3:
        bg = rng.randint(30, 55)
        return _Theme(
            bg=_grey(bg),
            fg=_grey(rng.randint(225, 245)),
            muted=_grey(rng.randint(135, 160)),
            border=_grey(bg + 45),
            field=_grey(bg + 18),
            accent=accent,
            title_bg=accent if accent_title else _grey(bg - 15),
            title_fg=(255, 255, 255),
        )
    bg = rng.randint(236, 252)
    fg = rng.randint(15, 50)
    return _Theme(
        bg=_grey(bg),
        fg=_grey(fg),
        muted=_grey(rng.randint(110, 140)),
        border=_grey(rng.randint(150, 190)),
        field=(255, 255, 255),
        accent=accent,
        title_bg=accent if accent_title else _grey(bg - rng.randint(15, 30)),
        title_fg=(255, 255, 255) if accent_title else _grey(fg),
    )


_APPS = (
    "Mailbox", "Finder", "Workspace", "Portal", "Notes", "Planner", "Office", "Atlas", "Nimbus", "Harbor",
)  # fmt: skip


def _desktop(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw, Box]:
    """A wallpaper with a taskbar and maybe a window in the back; returns the free area for the app."""
    w, h = size
    img = Image.new("RGB", size, _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.8)))
    draw = ImageDraw.Draw(img)
    bar_h = rng.randint(22, 28)
    on_top = rng.random() < 0.25
    bar = (0, 0, w, bar_h) if on_top else (0, h - bar_h, w, h)
    draw.rectangle(bar, fill=_hsv(rng.random(), 0.15, rng.uniform(0.1, 0.25)))
    for i in range(rng.randint(2, 6)):
        x = 6 + i * bar_h
        draw.rounded_rectangle(
            (x, bar[1] + 4, x + bar_h - 8, bar[3] - 4), radius=3, fill=_hsv(rng.random(), 0.6, 0.85)
        )
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    draw.text((w - 8, (bar[1] + bar[3]) // 2), clock, font=_font(12), fill=(235, 235, 235), anchor="rm")
    area = (0, bar_h, w, h) if on_top else (0, 0, w, h - bar_h)
    if rng.random() < 0.5:
        _back_window(rng, draw, area)
    return img, draw, area


def _back_window(rng: random.Random, draw: ImageDraw.ImageDraw, area: Box) -> None:
    """An unrelated window behind the app: a title bar and grey lines standing for text."""
    theme = _theme(rng)
    w = rng.randint((area[2] - area[0]) // 3, (area[2] - area[0]) * 2 // 3)
    h = rng.randint((area[3] - area[1]) // 3, (area[3] - area[1]) * 2 // 3)
    x0, y0 = _place(rng, area, w, h)
    content = _window(draw, theme, (x0, y0, x0 + w, y0 + h), rng.choice(_APPS), _font(11))
    for y in range(content[1] + 10, content[3] - 8, 14):
        draw.rectangle(
            (content[0] + 10, y, content[0] + 10 + rng.randint(20, w - 30), y + 5), fill=theme.muted
        )


def _place(rng: random.Random, area: Box, w: int, h: int) -> tuple[int, int]:
    """Top-left corner of a w x h window at a random position inside the area (clamped to its corner)."""
    x = area[0] + rng.randint(0, max(0, area[2] - area[0] - w))
    y = area[1] + rng.randint(0, max(0, area[3] - area[1] - h))
    return x, y


def _bar_h(font: ImageFont.FreeTypeFont) -> int:
    return int(font.size) + 10


def _window(
    draw: ImageDraw.ImageDraw, theme: _Theme, box: Box, title: str, font: ImageFont.FreeTypeFont
) -> Box:
    """Draw a window frame with a title bar; return the content box below the title bar."""
    x0, y0, x1, y1 = box
    draw.rectangle(_shift(box, 3, 3), fill=(40, 40, 40))
    draw.rectangle(box, fill=theme.bg, outline=theme.border)
    bar_bottom = y0 + _bar_h(font)
    draw.rectangle((x0, y0, x1, bar_bottom), fill=theme.title_bg)
    draw.text((x0 + 8, (y0 + bar_bottom) // 2), title, font=font, fill=theme.title_fg, anchor="lm")
    draw.text((x1 - 10, (y0 + bar_bottom) // 2), "x", font=font, fill=theme.title_fg, anchor="mm")
    return x0 + 1, bar_bottom + 1, x1 - 1, y1 - 1
