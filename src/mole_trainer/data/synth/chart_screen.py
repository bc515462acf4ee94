"""Chart-screen expert: questions about a bar or line chart."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from .common import (
    _APPS,
    RGB,
    Box,
    _desktop,
    _font,
    _hsv,
    _place,
    _Screen,
    _text_w,
    _Theme,
    _theme,
    _window,
)

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
