"""Requests the benchmarks share: GUI-like screenshots and instructions of different lengths."""

from __future__ import annotations

INSTRUCTIONS = [
    "Click on the 14th.",
    "Sign in as jdoe with the password shown on the note.",
    "What is the total?",
    "Open the settings and turn off notifications for every app except mail.",
    "Which series is highest in March?",
    "Type the address into the search box and press enter.",
    "Read the text in the image.",
    "Add two bottles of milk to the cart, then go to the checkout page and apply the coupon.",
]


def screenshot(size: tuple[int, int], seed: int):
    """A GUI-like RGB picture of `size` (seeded): title bar, panels and text lines."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", size, (rng.randrange(200, 256),) * 3)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, size[0], 30], fill=(40, 60, 90))
    for _ in range(25):
        x, y = rng.randrange(0, size[0] - 120), rng.randrange(34, size[1] - 40)
        colour = tuple(rng.randrange(0, 256) for _ in range(3))
        d.rectangle([x, y, x + rng.randrange(30, 120), y + rng.randrange(14, 40)], outline=colour, width=2)
        d.text((x + 4, y + 3), rng.choice(INSTRUCTIONS)[:20], fill=(0, 0, 0))
    return im
