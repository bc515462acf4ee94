"""Text-line detector benchmark on synthetic screens (mole_trainer.data.ocr.detect_text_lines).

Synthesises N screens per run (seeded, with the public `synthesize`), runs the detector WITHOUT the known
boxes and matches its boxes to the true text lines: a detection is correct when its IoU with a still
unmatched true line is >= 0.5 (greedy, best IoU first). Prints one line per run (recall, precision, F1,
images/s of the detector alone) and, last, one JSON object with every run and the means.

Truth per expert:
  ocr          the line boxes of the record's metadata (a receipt line is item + price, one box)
  calendar, login-window, chart-screen (--experts)
               every piece of text the generator drew (ImageDraw.text is wrapped while synthesising to
               record its box; items that later drawing changed, e.g. hidden under a window, are dropped). These are single words and
               numbers, not lines, so IoU matching undercounts a detector that joins a row of calendar
               days into one line; `covered` (share of text items lying >= 50 % inside one detection) and
               `on_text` (share of detections containing >= 50 % of some text item) are printed beside.

    .venv/bin/python bench/ocr_detector.py --screens 100 --runs 3
    .venv/bin/python bench/ocr_detector.py --screens 100 --jpeg 40     # compression artefacts
    .venv/bin/python bench/ocr_detector.py --screens 50 --experts calendar,login-window,chart-screen
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.ocr import box_iou, detect_text_lines, match_boxes
from mole_trainer.data.synth import DEFAULT_IMAGE_SIZE, SYNTH_EXPERTS, synthesize


@contextmanager
def _recording_text_boxes(store: dict[str, list]):
    """While active, every ImageDraw.text call records its box and its pixels just after drawing, and
    every PNG save files the boxes of the texts still visible under the name of the saved file."""
    pending: list = []
    original_text, original_save = ImageDraw.ImageDraw.text, Image.Image.save

    def text(self, xy, text, *args, **kwargs):
        out = original_text(self, xy, text, *args, **kwargs)
        font, anchor = kwargs.get("font"), kwargs.get("anchor")
        box = tuple(int(v) for v in self.textbbox(xy, text, font=font, anchor=anchor))
        pending.append((box, self._image.crop(box).tobytes()))
        return out

    def save(self, fp, *args, **kwargs):
        store[Path(fp).name] = [box for box, pixels in pending if self.crop(box).tobytes() == pixels]
        pending.clear()
        return original_save(self, fp, *args, **kwargs)

    ImageDraw.ImageDraw.text, Image.Image.save = text, save
    try:
        yield
    finally:
        ImageDraw.ImageDraw.text, Image.Image.save = original_text, original_save


def _inside(a, b) -> float:
    """Share of a's area inside b."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, iw) * max(0, ih) / max(1, (a[2] - a[0]) * (a[3] - a[1]))


def _screens(expert: str, n: int, seed: int, size: tuple[int, int], tmp: Path):
    """[(PIL image, true boxes)] of n fresh screens of one synthetic expert."""
    drawn: dict[str, list] = {}
    with _recording_text_boxes(drawn):
        synthesize(tmp, [expert], {"test": n}, seed, size)
    out = []
    for s in load_expert_dataset(tmp / expert)["test"]:
        truth = [tuple(b) for b in s.metadata["boxes"]] if expert == "ocr" else drawn[s.images[0].name]
        with Image.open(s.images[0]) as im:
            out.append((im.convert("RGB"), truth))
    return out


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def run_once(expert: str, n: int, seed: int, size: tuple[int, int], jpeg: int | None = None) -> dict:
    """Detector scores on n screens of one expert (re-encoded as JPEG of that quality when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        screens = _screens(expert, n, seed, size, Path(tmp))
    if jpeg is not None:
        screens = [(_jpeg(img, jpeg), truth) for img, truth in screens]
    t0 = time.perf_counter()
    detections = [detect_text_lines(img) for img, _ in screens]
    seconds = time.perf_counter() - t0
    pairs = list(zip(detections, screens, strict=True))
    n_true = sum(len(t) for _, t in screens)
    n_det = sum(len(d) for d in detections)
    hits = sum(match_boxes(d, t) for d, (_, t) in zip(detections, screens, strict=True))
    covered = sum(any(_inside(t, d) >= 0.5 for d in dets) for dets, (_, truth) in pairs for t in truth)
    on_text = sum(any(_inside(t, d) >= 0.5 for t in truth) for dets, (_, truth) in pairs for d in dets)
    recall, precision = hits / max(1, n_true), hits / max(1, n_det)
    mean_best_iou = statistics.fmean(
        max((box_iou(d, t) for d in dets), default=0.0) for dets, (_, truth) in pairs for t in truth
    )
    return {
        "expert": expert,
        "seed": seed,
        "jpeg": jpeg,
        "screens": n,
        "true_lines": n_true,
        "detections": n_det,
        "matched": hits,
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "f1": round(2 * recall * precision / max(1e-9, recall + precision), 4),
        "covered": round(covered / max(1, n_true), 4),
        "on_text": round(on_text / max(1, n_det), 4),
        "mean_best_iou": round(mean_best_iou, 4),
        "images_per_s": round(n / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--screens", type=int, default=100, help="screens per run and expert (100)")
    ap.add_argument("--runs", type=int, default=1, help="runs, seeds seed..seed+runs-1 (1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", default="ocr", help=f"comma-separated, of {','.join(SYNTH_EXPERTS)} (ocr)")
    ap.add_argument("--jpeg", type=int, default=None, help="re-encode screens as JPEG of this quality first")
    ap.add_argument("--size", default="x".join(map(str, DEFAULT_IMAGE_SIZE)), help="WIDTHxHEIGHT (448x336)")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    results = []
    for expert in args.experts.split(","):
        for r in range(args.runs):
            res = run_once(expert, args.screens, args.seed + r, size, args.jpeg)
            results.append(res)
            print(
                f"{expert:13s} seed={res['seed']} screens={res['screens']} lines={res['true_lines']} "
                f"detections={res['detections']} recall={res['recall']:.3f} precision={res['precision']:.3f} "
                f"f1={res['f1']:.3f} covered={res['covered']:.3f} on_text={res['on_text']:.3f} "
                f"images/s={res['images_per_s']:.0f}",
                flush=True,
            )
    means = {
        e: {
            k: round(statistics.fmean(r[k] for r in results if r["expert"] == e), 4)
            for k in ("recall", "precision", "f1", "covered", "on_text", "images_per_s")
        }
        for e in dict.fromkeys(r["expert"] for r in results)
    }
    print(json.dumps({"runs": results, "mean": means}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
