"""Reading text lines out of real screenshots for `mole data ocr-crops`.

Two engines give the text lines of an image:

- ``rapidocr``: PaddleOCR's PP-OCRv4 detection and recognition models (ONNX, shipped inside the
  ``rapidocr-onnxruntime`` wheel, so nothing is downloaded at run time). Every line comes with its
  recognised text and the recogniser's confidence.
- ``opencv``: the classical detector of data/ocr_detector.py (``detect_text_lines``); boxes only, no text.

Images of any shape are first made into 8-bit RGB the way a viewer shows them (``load_image``: EXIF
orientation applied, transparency flattened, 16-bit scaled), and images longer than
``DETECT_MAX_SIDE`` are detected on a downscaled copy with the boxes mapped back to source pixels;
recognition reads the full-resolution pixels of each box.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

from ..errors import UserError
from .ocr_detector import Box, detect_text_lines

ENGINES = ("rapidocr", "opencv")
RAPIDOCR_PACKAGE = "rapidocr_onnxruntime"
DEFAULT_MIN_CONFIDENCE = 0.8  # rapidocr lines at least this sure become training records
DETECT_MAX_SIDE = 2000  # longer images are detected downscaled to this (memory, time); boxes map back
# A row of exactly two pieces at most this many ink heights apart is one line (a receipt's item and its
# price, a label and its value; rapidocr returns them as two boxes); rows of more pieces (toolbars,
# calendar weeks, axis labels) stay apart, so neighbouring labels are not merged.
DEFAULT_JOIN_GAP = 10.0
# a blank between two characters' ink is a space when it is at least SPACE_PITCH of the line's mean
# character pitch (word spaces are about a third of an em, letter gaps a tenth) and SPACE_OVER_MEDIAN
# times the line's median blank between characters (most of those are letter gaps)
SPACE_PITCH = 0.36
SPACE_OVER_MEDIAN = 1.5
_NUMERIC = frozenset("0123456789.,:")
MIN_SIDE = 2  # smaller boxes (after mapping back) carry no readable text


@dataclass(frozen=True)
class TextLine:
    """One text line of an image: its box in source pixels, the text and confidence when recognised."""

    box: Box
    text: str | None = None
    confidence: float | None = None


def rapidocr_installed() -> bool:
    """Whether the rapidocr engine can run (its package is importable)."""
    return importlib.util.find_spec(RAPIDOCR_PACKAGE) is not None


def default_engine() -> str:
    """rapidocr when installed (the `ocr` extra that `make setup` installs), else opencv."""
    return "rapidocr" if rapidocr_installed() else "opencv"


def check_engine(engine: str | None) -> str:
    """The engine to use (None: the default); a UserError for an unknown or uninstalled one."""
    engine = default_engine() if engine is None else engine
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "rapidocr" and not rapidocr_installed():
        raise UserError(
            "engine rapidocr is not installed: run `make setup` (it installs the ocr extra and "
            "rapidocr-onnxruntime), or use --engine opencv (boxes only, no text)"
        )
    return engine


# ---------------------------------------------------------------------------------------------------------
# images


def load_image(path):
    """The image at `path` as 8-bit RGB as a viewer shows it: EXIF orientation applied, 16-bit and float
    pixels scaled to 8 bits, transparency flattened onto black or white, whichever contrasts more with
    the opaque pixels (dark text on a transparent background stays readable, and so does light text).
    Raises whatever PIL raises for an undecodable file."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        image = ImageOps.exif_transpose(im)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if image.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        opaque = np.asarray(rgba.getchannel("A")) > 127
        luma = np.asarray(rgba.convert("RGB").convert("L"))
        light_ink = bool(opaque.any()) and float(luma[opaque].mean()) > 127.5
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if light_ink else (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# engines


def read_text_lines(image, engine: str, params=None, join_gap: float = DEFAULT_JOIN_GAP) -> list[TextLine]:
    """The text lines of an 8-bit RGB PIL image, top to bottom, in source pixels.

    `params` are the opencv detector's DetectorParams (ignored by rapidocr); `join_gap` joins rapidocr's
    pieces of one row (see DEFAULT_JOIN_GAP; 0 keeps them apart).
    """
    from PIL import Image

    w, h = image.size
    scale = min(1.0, DETECT_MAX_SIDE / max(w, h))
    small = (
        image
        if scale == 1.0
        else image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    )
    if engine == "opencv":
        boxes = [_to_source(b, scale, w, h) for b in detect_text_lines(small, params)]
        return [TextLine(b) for b in boxes if b is not None]
    if engine != "rapidocr":
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return _rapidocr_lines(image, small, scale, join_gap)


def _to_source(box, scale: float, w: int, h: int) -> Box | None:
    """A detection box on the downscaled image as a box of source pixels (None when it shrinks away)."""
    import math

    x0, y0 = max(0, math.floor(box[0] / scale)), max(0, math.floor(box[1] / scale))
    x1, y1 = min(w, math.ceil(box[2] / scale)), min(h, math.ceil(box[3] / scale))
    return (x0, y0, x1, y1) if x1 - x0 >= MIN_SIDE and y1 - y0 >= MIN_SIDE else None


@cache
def _rapidocr():
    from rapidocr_onnxruntime import RapidOCR

    # no score filter: every line comes back with its confidence and the caller decides
    return RapidOCR(text_score=0.0, print_verbose=False)


def _rapidocr_lines(image, small, scale: float, join_gap: float) -> list[TextLine]:
    """PP-OCR detection on `small`, recognition on the source pixels of each (axis-aligned) box."""
    import numpy as np

    engine = _rapidocr()
    bgr = np.ascontiguousarray(np.asarray(small)[..., ::-1])
    quads, _ = engine(bgr, use_det=True, use_cls=False, use_rec=False)
    w, h = image.size
    boxes = []
    for quad in quads or []:
        q = np.asarray(quad, dtype=np.float64)
        box = _to_source((q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()), scale, w, h)
        if box is not None:
            boxes.append(box)
    if not boxes:
        return []
    src = np.asarray(image)[..., ::-1]
    crops = [np.ascontiguousarray(src[b[1] : b[3], b[0] : b[2]]) for b in boxes]
    recognised, _ = engine.text_rec(crops, return_word_box=True)
    # PP-OCR boxes are grown around the text (unclip); the reported box is the ink inside
    lines = [
        TextLine(_ink_box(crop, b), restore_spaces(crop, text, info[0], info[2]).strip(), float(conf))
        for b, crop, (text, conf, info) in zip(boxes, crops, recognised, strict=True)
    ]
    if join_gap > 0:
        lines = join_row_pieces(lines, join_gap)
    return sorted(lines, key=lambda ln: (ln.box[1], ln.box[0]))


def restore_spaces(crop, text: str, frames: float, columns: list[list[int]]) -> str:
    """`text` with a space put back between two characters whose ink lies apart by a blank run of at least
    SPACE_PITCH mean character pitches and SPACE_OVER_MEDIAN times the line's median blank between
    characters (PP-OCRv4's Chinese-English recogniser often drops the spaces of English text). `crop` is the recogniser's input,
    `frames` how many of its output columns cover the crop, `columns` the output column of each decoded
    character, grouped in words (rapidocr's return_word_box)."""
    import numpy as np

    cols = [c for word in columns for c in word]
    if len(cols) != len(text) or frames <= 0 or len(text) < 2:
        return text
    ink = _ink(crop)
    if ink is None:
        return text
    inked = ink.any(axis=0)
    width = crop.shape[1]
    xs = [(c + 0.5) * width / frames for c, ch in zip(cols, text, strict=True) if ch != " "]
    if len(xs) < 2:  # nothing between letters to measure (a text of spaces, one letter)
        return text
    pitch = (xs[-1] - xs[0]) / max(1, len(xs) - 1)
    blanks = {}
    for i in range(1, len(text)):
        if text[i] != " " and text[i - 1] != " ":
            a = max(0, int((cols[i - 1] + 0.5) * width / frames))
            b = min(width, int((cols[i] + 0.5) * width / frames))
            blanks[i] = _longest_blank(inked[a:b])
    if not blanks:
        return text
    least = max(SPACE_PITCH * pitch, SPACE_OVER_MEDIAN * float(np.median(list(blanks.values()))))
    out = [text[0]]
    for i in range(1, len(text)):
        # tabular digits (a '1' is as wide as an '8') leave wide blanks inside numbers
        numeric = text[i - 1] in _NUMERIC and text[i] in _NUMERIC
        if i in blanks and blanks[i] >= least * (2 if numeric else 1):
            out.append(" ")
        out.append(text[i])
    return "".join(out)


def _ink(crop):
    """Boolean mask of the text pixels of a line crop (None for a flat one): whichever side of the mid
    grey is the minority, so dark text on light and light text on dark both work."""
    import numpy as np

    grey = crop.mean(axis=2) if crop.ndim == 3 else crop.astype(np.float64)
    lo, hi = float(grey.min()), float(grey.max())
    if hi - lo < 1:
        return None
    dark = grey < (lo + hi) / 2
    return dark if dark.mean() <= 0.5 else ~dark


def _ink_box(crop, box: Box) -> Box:
    """`box` shrunk to the ink of its crop; unchanged when the crop is flat."""
    import numpy as np

    ink = _ink(crop)
    if ink is None:
        return box
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return (
        box[0] + int(cols[0]),
        box[1] + int(rows[0]),
        box[0] + int(cols[-1]) + 1,
        box[1] + int(rows[-1]) + 1,
    )


def _longest_blank(inked) -> int:
    best = run = 0
    for v in inked:
        run = 0 if v else run + 1
        best = max(best, run)
    return best


def join_row_pieces(lines: list[TextLine], join_gap: float) -> list[TextLine]:
    """Join the two pieces of a row that has exactly two (pieces share a row when they overlap vertically
    by >= 60 % of the taller) when the gap between them is at most `join_gap` heights of the lower one:
    text joined with a space left to right, the lowest confidence. Other lines are returned as they are."""
    out = []
    used: set[int] = set()
    for i, a in enumerate(lines):
        if i in used:
            continue
        row = [j for j, b in enumerate(lines) if j != i and _shares_row(a.box, b.box)]
        if len(row) == 1 and row[0] not in used:
            j = row[0]
            partners = [k for k, c in enumerate(lines) if k != j and _shares_row(lines[j].box, c.box)]
            left, right = sorted((a, lines[j]), key=lambda ln: ln.box[0])
            gap = right.box[0] - left.box[2]
            lower = min(a.box[3] - a.box[1], lines[j].box[3] - lines[j].box[1])
            if partners == [i] and gap <= join_gap * lower:
                used.update((i, j))
                out.append(_joined(left, right))
                continue
        out.append(a)
    return out


def _joined(left: TextLine, right: TextLine) -> TextLine:
    texts = [t for t in (left.text, right.text) if t is not None]
    confidences = [c for c in (left.confidence, right.confidence) if c is not None]
    return TextLine(
        (
            min(left.box[0], right.box[0]),
            min(left.box[1], right.box[1]),
            max(left.box[2], right.box[2]),
            max(left.box[3], right.box[3]),
        ),
        " ".join(t for t in texts if t) if texts else None,
        min(confidences) if len(confidences) == 2 else None,
    )


def _shares_row(a: Box, b: Box) -> bool:
    """Vertical overlap of at least 60 % of the taller box."""
    return min(a[3], b[3]) - max(a[1], b[1]) >= 0.6 * max(a[3] - a[1], b[3] - b[1])
