"""Calendar expert: click on a day of a month grid."""

from __future__ import annotations

import calendar
import datetime
import random

from .common import (
    _APPS,
    Box,
    _bar_h,
    _center,
    _desktop,
    _font,
    _place,
    _Screen,
    _Theme,
    _theme,
    _to_1000,
    _window,
)

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
