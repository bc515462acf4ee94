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

import calendar
import colorsys
import datetime
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..layout import SPLITS
from .formats import write_jsonl
from .ocr import OCR_PROMPT

SYNTH_EXPERTS: tuple[str, ...] = ("calendar", "login-window", "chart-screen", "ocr")
DEFAULT_COUNTS = {"train": 120, "val": 16, "test": 32}
DEFAULT_IMAGE_SIZE = (448, 336)  # width, height
MIN_IMAGE_SIZE = (320, 240)

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]


@dataclass
class _Screen:
    """One generated example before it is written: the image, the request, the answer and its sources."""

    image: Image.Image
    instruction: str
    answer: str
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# public entry point


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


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator of its own per record: a hash of the parts, independent of PYTHONHASHSEED."""
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


# ---------------------------------------------------------------------------------------------------------
# drawing helpers


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


# ---------------------------------------------------------------------------------------------------------
# calendar: click on a day of a month grid

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_CALENDAR_PROMPTS = (
    "Click on the {ord}.",
    "Select {month} {day}.",
    "Open day {day} in the calendar.",
    "Pick the {ord} of {month} {year}.",
    "Choose {weekday}, {month} {ord}.",
    "Click the date {iso}.",
    "Set the date to {month} {day}, {year}.",
    "I need an appointment on the {ord}; click that day.",
)


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _calendar_screen(rng: random.Random, size: tuple[int, int]) -> _Screen:
    img, draw, area = _desktop(rng, size)
    theme = _theme(rng)
    year, month = rng.randint(2018, 2032), rng.randint(1, 12)
    first_weekday = rng.choice((0, 6))  # weeks start on Monday or on Sunday
    weeks = calendar.Calendar(first_weekday).monthdatescalendar(year, month)
    title_font, head_font = _font(rng.randint(11, 13)), _font(rng.randint(13, 17))
    pad, head_h = rng.randint(6, 12), int(head_font.size) + 12
    # the cell height budget assumes the smallest day font; the 8 px margin absorbs a bigger one
    room_h = (area[3] - area[1] - _bar_h(title_font) - head_h - 19 - 2 * pad - 8) // len(weeks)
    cw = rng.randint(24, max(24, min(46, (area[2] - area[0] - 2 * pad - 8) // 7)))
    ch = rng.randint(17, max(17, min(32, room_h)))
    day_font = _font(rng.randint(11, max(11, min(15, ch - 6))))
    wd_h = int(day_font.size) + 8
    win_w, win_h = 7 * cw + 2 * pad, _bar_h(title_font) + head_h + wd_h + len(weeks) * ch + pad
    x0, y0 = _place(rng, area, win_w, win_h)
    title = rng.choice(
        ("Calendar", "Date picker", "Select date", "Schedule", f"{rng.choice(_APPS)} - Calendar")
    )
    content = _window(draw, theme, (x0, y0, x0 + win_w, y0 + win_h), title, title_font)
    _calendar_header(
        rng, draw, theme, (content[0], content[1], content[2], content[1] + head_h), head_font, year, month
    )
    grid_x, wd_top = x0 + pad, content[1] + head_h
    _weekday_row(rng, draw, theme, grid_x, wd_top, cw, wd_h, day_font, first_weekday)
    boxes = _day_cells(rng, draw, theme, weeks, month, (grid_x, wd_top + wd_h), (cw, ch), day_font)
    day = rng.choice(sorted(boxes))
    box = boxes[day]
    x, y = _to_1000(*_center(box), size)
    date = datetime.date(year, month, day)
    instruction = rng.choice(_CALENDAR_PROMPTS).format(
        ord=_ordinal(day),
        day=day,
        month=_MONTHS[month - 1],
        year=year,
        weekday=_WEEKDAYS[date.weekday()],
        iso=date.isoformat(),
    )
    meta = {
        "day": day,
        "month": month,
        "year": year,
        "box": list(box),
        "first_weekday": _WEEKDAYS[first_weekday],
    }
    return _Screen(img, instruction, f"click(x={x}, y={y})", meta)


def _calendar_header(rng, draw, theme: _Theme, box: Box, font, year: int, month: int) -> None:
    """Month and year between previous / next arrows."""
    name = _MONTHS[month - 1]
    label = rng.choice((f"{name} {year}", f"{name[:3]} {year}", f"{year} {name}", f"{name.upper()} {year}"))
    cx, cy = _center(box)
    draw.text((cx, cy), label, font=font, fill=theme.fg, anchor="mm")
    draw.text((box[0] + 12, cy), "<", font=font, fill=theme.muted, anchor="mm")
    draw.text((box[2] - 12, cy), ">", font=font, fill=theme.muted, anchor="mm")


def _weekday_row(rng, draw, theme: _Theme, x: int, y: int, cw: int, h: int, font, first_weekday: int) -> None:
    letters = rng.choice((2, 3)) if cw >= 34 else rng.choice((1, 2))
    for col in range(7):
        name = _WEEKDAYS[(first_weekday + col) % 7][:letters]
        draw.text((x + col * cw + cw / 2, y + h / 2), name, font=font, fill=theme.muted, anchor="mm")


def _day_cells(rng, draw, theme: _Theme, weeks, month: int, origin, cell, font) -> dict[int, Box]:
    """Draw the day cells; return the pixel box of each day of the shown month."""
    show_other_months = rng.random() < 0.5
    style = rng.choice(("plain", "grid", "boxes"))
    today = rng.randint(1, 28) if rng.random() < 0.6 else None
    (gx, gy), (cw, ch) = origin, cell
    boxes = {}
    for r, week in enumerate(weeks):
        for c, date in enumerate(week):
            box = (gx + c * cw, gy + r * ch, gx + (c + 1) * cw, gy + (r + 1) * ch)
            in_month = date.month == month
            if not in_month and not show_other_months:
                continue
            if style == "grid":
                draw.rectangle(box, outline=theme.border)
            elif style == "boxes" and in_month:
                draw.rounded_rectangle(
                    (box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), radius=3, fill=theme.field
                )
            colour = theme.fg if in_month else theme.muted
            if in_month and date.day == today:
                draw.rounded_rectangle(
                    (box[0] + 2, box[1] + 1, box[2] - 2, box[3] - 1), radius=ch // 2, fill=theme.accent
                )
                colour = (255, 255, 255)
            draw.text(_center(box), str(date.day), font=font, fill=colour, anchor="mm")
            if in_month:
                boxes[date.day] = box
    return boxes


# ---------------------------------------------------------------------------------------------------------
# login window: the next action (click or type) towards the requested goal

_USERS = (
    "jdoe", "alice", "bob.smith", "mchen", "priya", "omar_k", "lena", "tkato", "sam", "admin", "grace.h", "ivan",
)  # fmt: skip
_PASSWORD_WORDS = ("sunny", "tiger", "maple", "rocket", "violet", "cobalt", "pepper", "falcon")

_LOGIN_PROMPTS = {
    "login_as": (
        "Log in as {user}.",
        "Sign in as {user}.",
        "Sign in with the account {user}.",
        "Use the account {user} to log in.",
    ),
    "login_as_pw": ("Log in as {user} with password {pw}.", "Sign in: user {user}, password {pw}."),
    "type_username": (
        "Type the username {user}.",
        "Enter {user} in the {ulabel} field.",
        "Fill in the {ulabel} with {user}.",
    ),
    "type_password": (
        "Enter the password {pw}.",
        "Type {pw} into the password field.",
        "Fill in the password: {pw}",
    ),
    "submit": (
        "Press the {login} button.",
        "Click {login}.",
        "Submit the login form.",
        "Press the sign in button.",
    ),
    "cancel": ("Cancel the login.", "Click {cancel}.", "Close this dialog without logging in."),
    "forgot": ("I forgot my password.", "Click '{forgot}'.", "Open the password recovery link."),
    "remember": ("Tick 'Remember me'.", "Make the app remember me.", "Check the remember me box."),
    "focus_password": ("Click into the password field.", "Put the cursor in the password box."),
}
_LOGIN_STYLE_TRIES = 4
_LOGIN_WEIGHTS = {"login_as": 4, "login_as_pw": 3, "type_username": 2, "type_password": 2, "submit": 2}


@dataclass
class _LoginForm:
    """Texts and state of one login form."""

    heading: str
    user_label: str
    pass_label: str
    login: str
    cancel: str | None
    forgot: str | None
    remember: bool
    username: str  # what the username field holds ("" = empty)
    password_filled: bool


def _login_form(rng: random.Random, user: str) -> _LoginForm:
    app = rng.choice(_APPS)
    filled = rng.random() < 0.45
    username = (user if rng.random() < 0.7 else rng.choice(_USERS)) if filled else ""
    return _LoginForm(
        heading=rng.choice(("Sign in", "Log in", f"Log in to {app}", f"{app} account", "Welcome back")),
        user_label=rng.choice(("Username", "User name", "Email", "Login", "Account")),
        pass_label=rng.choice(("Password", "Your password")),
        login=rng.choice(("Log in", "Sign in", "Continue", "Log on", "Sign In")),
        cancel=rng.choice(("Cancel", "Close")) if rng.random() < 0.6 else None,
        forgot=rng.choice(("Forgot password?", "Reset password", "Trouble signing in?"))
        if rng.random() < 0.5
        else None,
        remember=rng.random() < 0.5,
        username=username,
        password_filled=bool(username) and rng.random() < 0.5,
    )


@dataclass(frozen=True)
class _LoginStyle:
    """Fonts, sizes and arrangement of a login form."""

    title_font: ImageFont.FreeTypeFont
    font: ImageFont.FreeTypeFont
    head_font: ImageFont.FreeTypeFont
    gap: int
    field_w: int
    field_h: int
    btn_h: int
    btn_pad: int
    pad: int  # between the window frame and the form
    labels_left: bool
    stacked_buttons: bool
    primary_last: bool


def _login_style(rng: random.Random, compact: bool) -> _LoginStyle:
    """A random style, or the smallest one (fits MIN_IMAGE_SIZE) when compact."""
    if compact:
        fs, head, gap, pad, labels_left, stacked = 11, 15, 5, 10, True, False
    else:
        fs, head, gap, pad = rng.randint(11, 15), rng.randint(15, 20), rng.randint(6, 12), rng.randint(12, 24)
        labels_left, stacked = rng.random() < 0.4, rng.random() < 0.5
    return _LoginStyle(
        title_font=_font(11 if compact else rng.randint(11, 13)),
        font=_font(fs),
        head_font=_font(head),
        gap=gap,
        field_w=rng.randint(140, 180 if compact else 210),
        field_h=fs + (8 if compact else rng.randint(8, 12)),
        btn_h=fs + (10 if compact else rng.randint(10, 14)),
        btn_pad=12 if compact else rng.randint(12, 20),
        pad=pad,
        labels_left=labels_left,
        stacked_buttons=stacked,
        primary_last=rng.random() < 0.5,
    )


def _login_layout(form: _LoginForm, st: _LoginStyle) -> tuple[dict[str, Box], int, int]:
    """Widget boxes relative to the form's top-left corner, and the form's width and height."""
    font, fs, gap = st.font, int(st.font.size), st.gap
    label_w = (
        max(_text_w(font, form.user_label), _text_w(font, form.pass_label)) + 10 if st.labels_left else 0
    )
    buttons = [("login", form.login)] + ([("cancel", form.cancel)] if form.cancel else [])
    btn_ws = [_text_w(font, t) + 2 * st.btn_pad for _, t in buttons]
    field_w = max(st.field_w, sum(btn_ws) + gap)
    boxes = {"heading": (0, 0, _text_w(st.head_font, form.heading), int(st.head_font.size) + 4)}
    y = boxes["heading"][3] + gap + 4
    for name, label in (("username", form.user_label), ("password", form.pass_label)):
        if st.labels_left:
            boxes[f"{name}_label"] = (0, y, label_w, y + st.field_h)
        else:
            boxes[f"{name}_label"] = (0, y, _text_w(font, label), y + fs + 2)
            y += fs + 6
        boxes[name] = (label_w, y, label_w + field_w, y + st.field_h)
        y += st.field_h + gap
    if form.remember:
        boxes["remember"] = (label_w, y, label_w + fs + 1, y + fs + 1)
        y += fs + 1 + gap
    if st.stacked_buttons:  # full field width, one under the other
        for name, _ in buttons:
            boxes[name] = (label_w, y, label_w + field_w, y + st.btn_h)
            y += st.btn_h + gap
    else:  # one row, right-aligned
        order = list(zip(buttons, btn_ws, strict=True))
        if st.primary_last:
            order.reverse()
        x = label_w + field_w - sum(btn_ws) - gap * (len(order) - 1)
        for (name, _), bw in order:
            boxes[name] = (x, y, x + bw, y + st.btn_h)
            x += bw + gap
        y += st.btn_h + gap
    if form.forgot:
        boxes["forgot"] = (label_w, y, label_w + _text_w(font, form.forgot), y + fs + 2)
        y += fs + 2
    return boxes, max(b[2] for b in boxes.values()), y


def _draw_login(
    rng, draw, theme: _Theme, form: _LoginForm, boxes: dict[str, Box], st: _LoginStyle, pw_len: int
) -> None:
    font, head_font = st.font, st.head_font
    draw.text(boxes["heading"][:2], form.heading, font=head_font, fill=theme.fg)
    radius = rng.randint(0, 6)
    shown = {"username": form.username, "password": "*" * pw_len if form.password_filled else ""}
    for name, label in (("username", form.user_label), ("password", form.pass_label)):
        lb = boxes[f"{name}_label"]
        draw.text((lb[0], (lb[1] + lb[3]) / 2), label, font=font, fill=theme.fg, anchor="lm")
        fb = boxes[name]
        draw.rounded_rectangle(fb, radius=radius, fill=theme.field, outline=theme.border)
        value = shown[name]
        text, colour = (value, theme.fg) if value else (f"Enter {label.lower()}", theme.muted)
        if value or rng.random() < 0.4:
            draw.text((fb[0] + 6, (fb[1] + fb[3]) / 2), text, font=font, fill=colour, anchor="lm")
    if form.remember:
        rb = boxes["remember"]
        draw.rectangle(rb, fill=theme.field, outline=theme.border)
        draw.text((rb[2] + 6, (rb[1] + rb[3]) / 2), "Remember me", font=font, fill=theme.fg, anchor="lm")
    _button(draw, boxes["login"], form.login, font, theme.accent, (255, 255, 255), None, radius)
    if form.cancel:
        _button(draw, boxes["cancel"], form.cancel, font, theme.field, theme.fg, theme.border, radius)
    if form.forgot:
        fb = boxes["forgot"]
        draw.text(fb[:2], form.forgot, font=font, fill=theme.accent)
        if rng.random() < 0.5:
            draw.line((fb[0], fb[3], fb[2], fb[3]), fill=theme.accent)


def _button(draw, box: Box, label: str, font, fill: RGB, text: RGB, outline: RGB | None, radius: int) -> None:
    draw.rounded_rectangle(box, radius=radius, fill=fill, outline=outline)
    draw.text(_center(box), label, font=font, fill=text, anchor="mm")


def _login_step(intent: str, form: _LoginForm, user: str, pw: str) -> tuple[str, str, str | None]:
    """(action name, target widget, typed text) of the next step towards the intent."""
    if intent in ("login_as", "login_as_pw") and form.username != user:
        return "type", "username", user
    if intent == "login_as_pw" and not form.password_filled:
        return "type", "password", pw
    if intent == "type_username":
        return "type", "username", user
    if intent == "type_password":
        return "type", "password", pw
    target = {"cancel": "cancel", "forgot": "forgot", "remember": "remember", "focus_password": "password"}
    return "click", target.get(intent, "login"), None


def _login_intents(form: _LoginForm, user: str) -> dict[str, int]:
    """Intents that make sense for this form, with their sampling weights."""
    weights = dict(_LOGIN_WEIGHTS)
    if form.username == user:
        del weights["type_username"]
    if form.password_filled:
        del weights["type_password"]
    for intent, present in (("cancel", form.cancel), ("forgot", form.forgot), ("remember", form.remember)):
        if present:
            weights[intent] = 1
    weights["focus_password"] = 1
    return weights


def _login_screen(rng: random.Random, size: tuple[int, int]) -> _Screen:
    img, draw, area = _desktop(rng, size)
    theme = _theme(rng)
    user, pw = rng.choice(_USERS), f"{rng.choice(_PASSWORD_WORDS)}{rng.randint(10, 99)}"
    form = _login_form(rng, user)
    for attempt in range(_LOGIN_STYLE_TRIES):  # the last try is the compact style, which always fits
        st = _login_style(rng, compact=attempt == _LOGIN_STYLE_TRIES - 1)
        rel, form_w, form_h = _login_layout(form, st)
        win_w, win_h = form_w + 2 * st.pad, _bar_h(st.title_font) + form_h + 2 * st.pad
        if win_w <= area[2] - area[0] and win_h <= area[3] - area[1]:
            break
    x0, y0 = _place(rng, area, win_w, win_h)
    content = _window(draw, theme, (x0, y0, x0 + win_w, y0 + win_h), form.heading, st.title_font)
    boxes = {k: _shift(b, x0 + st.pad, content[1] + st.pad) for k, b in rel.items()}
    _draw_login(rng, draw, theme, form, boxes, st, pw_len=rng.randint(6, 12))
    weights = _login_intents(form, user)
    intent = rng.choices(list(weights), weights=list(weights.values()))[0]
    name, target, text = _login_step(intent, form, user, pw)
    x, y = _to_1000(*_center(boxes[target]), size)
    action: dict[str, Any] = {"name": name, "x": x, "y": y}
    answer = f"click(x={x}, y={y})"
    if text is not None:
        action["text"] = text
        answer = f"type(x={x}, y={y}, text={json.dumps(text)})"
    instruction = rng.choice(_LOGIN_PROMPTS[intent]).format(
        user=user,
        pw=pw,
        ulabel=form.user_label.lower(),
        login=form.login,
        cancel=form.cancel,
        forgot=form.forgot,
    )
    meta = {
        "intent": intent,
        "action": action,
        "target": target,
        "username_value": form.username,
        "password_filled": form.password_filled,
        "boxes": {k: list(b) for k, b in boxes.items() if not k.endswith("_label") and k != "heading"},
    }
    return _Screen(img, instruction, answer, meta)


# ---------------------------------------------------------------------------------------------------------
# chart screen: questions about a bar or line chart

_CATEGORY_SETS = (  # (noun, names, ordered: take a consecutive run instead of a random sample)
    ("quarter", ("Q1", "Q2", "Q3", "Q4"), True),
    ("month", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), True),
    ("region", ("North", "South", "East", "West", "Central"), False),
    ("product", ("Alpha", "Beta", "Gamma", "Delta", "Omega"), False),
    ("store", ("Downtown", "Airport", "Mall", "Harbor", "Campus"), False),
    ("channel", ("Web", "Mobile", "Retail", "Partner"), False),
)
_METRICS = ("Revenue", "Sales", "Users", "Orders", "Visits", "Downloads", "Signups", "Tickets")

_CHART_PROMPTS = {
    "max": (
        "Which {noun} has the highest {metric}?",
        "Which {noun} is highest in the chart?",
        "Name the {noun} with the largest value.",
        "What is the top {noun} by {metric}?",
    ),
    "min": (
        "Which {noun} has the lowest {metric}?",
        "Which {noun} is lowest in the chart?",
        "Name the {noun} with the smallest value.",
        "What is the weakest {noun} by {metric}?",
    ),
    "value": (
        "What is the value of {name}?",
        "What {metric} does the chart show for {name}?",
        "Read the value for {name}.",
        "How high is {name} in this chart?",
        "What is the {metric} of {name}?",
    ),
}


def _nice_step(span: float) -> int:
    """A 1-2-5 x 10^k tick step of at least span."""
    mag = 10 ** max(0, math.floor(math.log10(max(span, 1))))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= span)


def _chart_data(rng: random.Random) -> tuple[str, list[str], list[int]]:
    noun, pool, ordered = rng.choice(_CATEGORY_SETS)
    n = rng.randint(2, 4)
    if ordered:
        start = rng.randint(0, len(pool) - n)
        names = list(pool[start : start + n])
    else:
        names = rng.sample(pool, n)
    scale = rng.choice((10, 20, 50, 100, 200, 500, 1000, 5000))
    values = rng.sample(range(max(1, scale // 10), scale + 1), n)  # distinct, so max / min are unique
    return noun, names, values


def _chart_screen(rng: random.Random, size: tuple[int, int]) -> _Screen:
    img, draw, area = _desktop(rng, size)
    theme = _theme(rng)
    noun, names, values = _chart_data(rng)
    metric = rng.choice(_METRICS)
    kind = rng.choice(("bar", "line"))
    aw, ah = area[2] - area[0], area[3] - area[1]
    min_w = min(aw - 4, max(aw * 3 // 5, 150 + 60 * len(names)))  # about 60 px per category label
    win_w, win_h = rng.randint(min_w, aw - 4), rng.randint(ah * 7 // 10, ah - 4)
    x0, y0 = _place(rng, area, win_w, win_h)
    app = rng.choice(
        ("Dashboard", "Analytics", "Report viewer", "Spreadsheet", f"{rng.choice(_APPS)} Insights")
    )
    content = _window(draw, theme, (x0, y0, x0 + win_w, y0 + win_h), app, _font(rng.randint(11, 13)))
    title = rng.choice(
        (f"{metric} by {noun}", f"{metric} per {noun}", f"{noun.capitalize()} {metric.lower()}")
    )
    marks, plot = _draw_chart(rng, draw, theme, content, (kind, title, metric), names, values)
    question = rng.choice(("max", "min", "value", "value"))
    if question == "value":
        target = rng.choice(names)
        answer = str(values[names.index(target)])
    else:
        target = names[values.index(max(values) if question == "max" else min(values))]
        answer = target
    instruction = rng.choice(_CHART_PROMPTS[question]).format(noun=noun, metric=metric.lower(), name=target)
    meta = {
        "chart_type": kind,
        "title": title,
        "metric": metric,
        "series": names,
        "values": values,
        "question": question,
        "target": target,
        "plot_box": list(plot),
        "boxes": [list(b) for b in marks],
    }
    return _Screen(img, instruction, answer, meta)


def _draw_chart(rng, draw, theme: _Theme, content: Box, labels, names, values) -> tuple[list[Box], Box]:
    """Title, legend, axes with ticks and the marks; return the mark boxes and the plot box.

    `labels` is (chart kind, title, metric); a bar chart has one colour per category, a line chart one series.
    """
    kind, title, metric = labels
    font, title_font = _font(rng.randint(11, 13)), _font(rng.randint(13, 17))
    pad = rng.randint(8, 16)
    cx0, cy0, cx1, cy1 = content
    draw.text(((cx0 + cx1) / 2, cy0 + pad), title, font=title_font, fill=theme.fg, anchor="ma")
    hue = rng.random()
    colours = [
        _hsv(hue + i / len(names), rng.uniform(0.5, 0.85), rng.uniform(0.55, 0.8)) for i in range(len(names))
    ]
    legend = list(zip(names, colours, strict=True)) if kind == "bar" else [(metric, colours[0])]
    legend_w = max(_text_w(font, t) for t, _ in legend) + 22
    top = cy0 + pad + int(title_font.size) + 10
    step = _nice_step(max(values) / rng.choice((3, 4, 5)))
    y_top = step * math.ceil(max(values) / step)
    label_w = _text_w(font, str(y_top)) + 8
    plot = (cx0 + pad + label_w, top + 6, cx1 - pad - legend_w - 6, cy1 - pad - int(font.size) - 8)
    _legend(draw, theme, (plot[2] + 10, plot[1]), legend, font)
    _axes(rng, draw, theme, plot, step, y_top, font)
    slot = (plot[2] - plot[0]) / len(names)
    for i, name in enumerate(names):
        draw.text((plot[0] + slot * (i + 0.5), plot[3] + 4), name, font=font, fill=theme.fg, anchor="ma")

    def y_of(v: int) -> float:
        return plot[3] - (plot[3] - plot[1]) * v / y_top

    marks = (
        _bars(rng, draw, plot, slot, values, colours, y_of)
        if kind == "bar"
        else _line(draw, plot, slot, values, colours[0], y_of)
    )
    if rng.random() < 0.5:  # value labels; without them the value must be read off the axis
        for box, v in zip(marks, values, strict=True):
            draw.text(((box[0] + box[2]) / 2, box[1] - 2), str(v), font=font, fill=theme.fg, anchor="md")
    return marks, plot


def _legend(draw, theme: _Theme, origin: tuple[int, int], entries, font) -> None:
    x, y = origin
    for i, (label, colour) in enumerate(entries):
        ly = y + i * (int(font.size) + 6)
        draw.rectangle((x, ly + 2, x + 10, ly + 12), fill=colour)
        draw.text((x + 14, ly + 7), label, font=font, fill=theme.fg, anchor="lm")


def _axes(rng, draw, theme: _Theme, plot: Box, step: int, y_top: int, font) -> None:
    gridlines = rng.random() < 0.6
    for v in range(0, y_top + 1, step):
        y = plot[3] - (plot[3] - plot[1]) * v / y_top
        if gridlines and v:
            draw.line((plot[0], y, plot[2], y), fill=theme.border)
        draw.line((plot[0] - 3, y, plot[0], y), fill=theme.fg)
        draw.text((plot[0] - 5, y), str(v), font=font, fill=theme.fg, anchor="rm")
    draw.line((plot[0], plot[1], plot[0], plot[3]), fill=theme.fg)
    draw.line((plot[0], plot[3], plot[2], plot[3]), fill=theme.fg)


def _bars(rng, draw, plot: Box, slot: float, values, colours, y_of: Callable[[int], float]) -> list[Box]:
    width = slot * rng.uniform(0.4, 0.7)
    boxes = []
    for i, (v, colour) in enumerate(zip(values, colours, strict=True)):
        cx = plot[0] + slot * (i + 0.5)
        box = (round(cx - width / 2), round(y_of(v)), round(cx + width / 2), plot[3])
        draw.rectangle(box, fill=colour)
        boxes.append(box)
    return boxes


def _line(draw, plot: Box, slot: float, values, colour: RGB, y_of: Callable[[int], float]) -> list[Box]:
    points = [(plot[0] + slot * (i + 0.5), y_of(v)) for i, v in enumerate(values)]
    draw.line(points, fill=colour, width=2)
    boxes = []
    for px, py in points:
        box = (round(px) - 3, round(py) - 3, round(px) + 3, round(py) + 3)
        draw.ellipse(box, fill=colour)
        boxes.append(box)
    return boxes


# ---------------------------------------------------------------------------------------------------------
# OCR: transcribe a text block, a receipt or a note

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
