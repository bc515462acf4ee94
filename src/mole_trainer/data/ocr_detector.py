"""The classical text-line detector (OpenCV morphology + connected components; the ``opencv`` engine of
ocr_engines.py) and the matching of detected boxes to true ones (IoU) that its tests and bench score it by.
"""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 / y1 exclusive


@dataclass(frozen=True)
class DetectorParams:
    """Knobs of detect_text_lines (pixel sizes are for screens of a few hundred pixels a side)."""

    min_height: int = 6  # a line box lower than this is noise (a rule, a dot)
    max_height: int = 48  # a taller box is a picture, a bar or a merged paragraph, not one line
    min_width: int = 6
    min_fill: float = 0.35  # share of the box covered by text pixels after the horizontal closing
    char_gap: int = 5  # horizontal closing: joins letters and words of one line
    row_gap: float = 10.0  # boxes on one row closer than this many line heights become one line
    min_columns: float = 0.4  # share of columns with an edge in the middle half of the line's height
    line_length: int = 40  # straight runs at least this long are rules or frames, not text


def detect_text_lines(image, params: DetectorParams | None = None) -> list[Box]:
    """Boxes of the text lines of an image (PIL image or RGB / grey numpy array), top to bottom.

    Edges (morphological gradient, so dark-on-light and light-on-dark text look alike) are binarised
    with Otsu, long straight rules and frames are removed, letters are joined into lines by a
    horizontal closing, and the connected components that are line-shaped (height, width, fill) are
    kept; pieces of one row separated by a wide gap (a receipt's item and its price) are merged.
    """
    import cv2
    import numpy as np

    p = params or DetectorParams()
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    grad = cv2.morphologyEx(arr, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    _, bw = cv2.threshold(grad, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    for kernel in ((p.line_length, 1), (1, p.line_length)):
        rules = cv2.morphologyEx(bw, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, kernel))
        bw = cv2.subtract(bw, rules)
    joined = cv2.morphologyEx(bw, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (p.char_gap, 1)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    boxes = []
    for x, y, w, h, area in stats[1:]:
        if not (p.min_height <= h <= p.max_height and w >= p.min_width and area >= p.min_fill * w * h):
            continue
        # letters put edges in most columns of the line's middle band; a hollow shape (an icon, a
        # checkbox, a row of them) only in the few columns of its sides
        band = bw[y + h // 4 : y + h - h // 4, x : x + w]
        if np.count_nonzero(band.any(axis=0)) >= p.min_columns * w:
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
    return sorted(_merge_rows(boxes, bw, p.row_gap), key=lambda b: (b[1], b[0]))


def _merge_rows(boxes: list[Box], edges, row_gap: float) -> list[Box]:
    """Merge boxes that share a row (mostly the same vertical span) with nothing but background between.

    A receipt's item and its price form one line; two texts with a field border between them do not.
    """
    boxes = sorted(boxes, key=lambda b: b[0])
    merged = True
    while merged:
        merged = False
        out: list[Box] = []
        for b in boxes:
            for i, a in enumerate(out):
                if _joinable(a, b, edges, row_gap):
                    out[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    merged = True
                    break
            else:
                out.append(b)
        boxes = sorted(out, key=lambda b: b[0])
    return boxes


def _joinable(a: Box, b: Box, edges, row_gap: float) -> bool:
    top, bottom = max(a[1], b[1]), min(a[3], b[3])
    if bottom - top < 0.6 * max(a[3] - a[1], b[3] - b[1]):
        return False
    left, right = min(a[2], b[2]), max(a[0], b[0])
    if right - left > row_gap * min(a[3] - a[1], b[3] - b[1]):
        return False
    return right <= left or not edges[top:bottom, left:right].any()


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_pairs(detected: list[Box], truth: list[Box], min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy matching: detections by best IoU first, each to one unmatched true box at IoU >= min_iou;
    the (detection index, true index) pairs."""
    pairs = sorted(
        ((box_iou(d, t), i, j) for i, d in enumerate(detected) for j, t in enumerate(truth)), reverse=True
    )
    used_d, used_t, out = set(), set(), []
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def match_boxes(detected: list[Box], truth: list[Box], min_iou: float = 0.5) -> int:
    """How many true boxes match_pairs matches."""
    return len(match_pairs(detected, truth, min_iou))
