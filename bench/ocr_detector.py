"""OCR engine benchmark on synthetic screens: rapidocr (PP-OCRv4) against the OpenCV detector.

Synthesises N screens per run and expert (seeded, with the public `synthesize`), runs each engine of
`mole data ocr-crops` (mole_trainer.data.ocr_engines.read_text_lines, the same call the crops use)
WITHOUT the known boxes and matches its boxes to the true text lines: a detection is correct when its
IoU with a still unmatched true line is >= 0.5 (greedy, best IoU first). For rapidocr, which also reads
the text, the character error rate (CER) is the Levenshtein distance of the recognised text to the true
text over the true characters of the matched lines (`cer`); `cer_all` also counts every unmatched true
line as wholly missed. Seconds per image are medians over the screens, in this process, for each engine
(opencv is the baseline). Prints one line per engine and run and, last, one JSON object with every run,
the means per expert and engine, and whether rapidocr meets the bar on the ocr screens
(recall >= 0.95 and cer <= 0.05).

Truth per expert:
  ocr          the line boxes and texts of the record's metadata (a receipt line is item + price, one box)
  calendar, login-window, chart-screen (--experts)
               every piece of text the generator drew (ImageDraw.text is wrapped while synthesising to
               record its box and string; items that later drawing changed, e.g. hidden under a window,
               are dropped). These are single words and numbers, not lines, so IoU matching undercounts an
               engine that joins a row of calendar days into one line; `covered` (share of text items
               lying >= 50 % inside one detection) and `on_text` (share of detections containing >= 50 %
               of some text item) are printed beside.

    .venv/bin/python bench/ocr_detector.py --screens 30
    .venv/bin/python bench/ocr_detector.py --screens 30 --jpeg 40     # compression artefacts
    .venv/bin/python bench/ocr_detector.py --screens 30 --experts ocr,calendar,login-window,chart-screen
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
from mole_trainer.data.ocr_detector import box_iou, match_pairs
from mole_trainer.data.ocr_engines import (
    DEFAULT_JOIN_GAP,
    ENGINES,
    load_image,
    rapidocr_installed,
    read_text_lines,
)
from mole_trainer.data.synth import DEFAULT_IMAGE_SIZE, SYNTH_EXPERTS, synthesize
from mole_trainer.eval.task_metrics import levenshtein


@contextmanager
def _recording_text_boxes(store: dict[str, list]):
    """While active, every ImageDraw.text call records its box and its pixels just after drawing, and
    every PNG save files the (box, text) of the texts still visible under the name of the saved file."""
    pending: list = []
    original_text, original_save = ImageDraw.ImageDraw.text, Image.Image.save

    def text(self, xy, text, *args, **kwargs):
        out = original_text(self, xy, text, *args, **kwargs)
        font, anchor = kwargs.get("font"), kwargs.get("anchor")
        box = tuple(int(v) for v in self.textbbox(xy, text, font=font, anchor=anchor))
        pending.append((box, str(text), self._image.crop(box).tobytes()))
        return out

    def save(self, fp, *args, **kwargs):
        store[Path(fp).name] = [(box, t) for box, t, pixels in pending if self.crop(box).tobytes() == pixels]
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
    """[(RGB image, true boxes, true texts)] of n fresh screens of one synthetic expert."""
    drawn: dict[str, list] = {}
    with _recording_text_boxes(drawn):
        synthesize(tmp, [expert], {"test": n}, seed, size)
    out = []
    for s in load_expert_dataset(tmp / expert)["test"]:
        if expert == "ocr":
            truth = list(zip((tuple(b) for b in s.metadata["boxes"]), s.metadata["lines"], strict=True))
        else:
            truth = [(b, t) for b, t in drawn[s.images[0].name] if t.strip()]
        out.append((load_image(s.images[0]), [b for b, _ in truth], [t for _, t in truth]))
    return out


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def score(engine: str, screens, join_gap: float = DEFAULT_JOIN_GAP) -> dict:
    """Line recall / precision / F1 at IoU >= 0.5, covered / on_text, CER (rapidocr), seconds per image."""
    seconds, detections = [], []
    for img, _, _ in screens:
        t0 = time.perf_counter()
        detections.append(read_text_lines(img, engine, join_gap=join_gap))
        seconds.append(time.perf_counter() - t0)
    n_true = sum(len(t) for _, t, _ in screens)
    n_det = sum(len(d) for d in detections)
    hits = errors = chars = missed = 0
    covered = on_text = 0
    best_ious = []
    for dets, (_, truth, texts) in zip(detections, screens, strict=True):
        boxes = [d.box for d in dets]
        pairs = match_pairs(boxes, truth)
        hits += len(pairs)
        for i, j in pairs:
            if dets[i].text is not None:
                errors += levenshtein(dets[i].text, texts[j])
                chars += len(texts[j])
        missed += sum(len(texts[j]) for j in set(range(len(truth))) - {j for _, j in pairs})
        covered += sum(any(_inside(t, d) >= 0.5 for d in boxes) for t in truth)
        on_text += sum(any(_inside(t, d) >= 0.5 for t in truth) for d in boxes)
        best_ious += [max((box_iou(d, t) for d in boxes), default=0.0) for t in truth]
    recall, precision = hits / max(1, n_true), hits / max(1, n_det)
    reads = any(d.text is not None for dets in detections for d in dets)
    return {
        "engine": engine,
        "true_lines": n_true,
        "detections": n_det,
        "matched": hits,
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "f1": round(2 * recall * precision / max(1e-9, recall + precision), 4),
        "covered": round(covered / max(1, n_true), 4),
        "on_text": round(on_text / max(1, n_det), 4),
        "mean_best_iou": round(statistics.fmean(best_ious), 4) if best_ious else 0.0,
        "cer": round(errors / max(1, chars), 4) if reads else None,
        "cer_all": round((errors + missed) / max(1, chars + missed), 4) if reads else None,
        "s_per_image": round(statistics.median(seconds), 4),
    }


def run_once(
    expert: str,
    n: int,
    seed: int,
    size: tuple[int, int],
    engines,
    jpeg: int | None = None,
    join_gap=DEFAULT_JOIN_GAP,
) -> list:
    """Each engine's scores on the same n screens of one expert (re-encoded as JPEG when `jpeg`)."""
    with tempfile.TemporaryDirectory() as tmp:
        screens = _screens(expert, n, seed, size, Path(tmp))
    if jpeg is not None:
        screens = [(_jpeg(img, jpeg), boxes, texts) for img, boxes, texts in screens]
    return [
        {
            "expert": expert,
            "seed": seed,
            "jpeg": jpeg,
            "join_gap": join_gap,
            "screens": n,
            **score(e, screens, join_gap),
        }
        for e in engines
    ]


MEAN_KEYS = ("recall", "precision", "f1", "covered", "on_text", "cer", "cer_all", "s_per_image")
BAR = {"recall": 0.95, "cer": 0.05}  # rapidocr on the synthetic ocr screens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--screens", type=int, default=30, help="screens per run and expert (30)")
    ap.add_argument("--runs", type=int, default=1, help="runs, seeds seed..seed+runs-1 (1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", default="ocr", help=f"comma-separated, of {','.join(SYNTH_EXPERTS)} (ocr)")
    ap.add_argument(
        "--engines", default=None, help=f"comma-separated, of {','.join(ENGINES)} (all installed)"
    )
    ap.add_argument("--jpeg", type=int, default=None, help="re-encode screens as JPEG of this quality first")
    ap.add_argument(
        "--join-gap",
        type=float,
        default=DEFAULT_JOIN_GAP,
        help=f"rapidocr row joining ({DEFAULT_JOIN_GAP}; 0: off)",
    )
    ap.add_argument("--size", default="x".join(map(str, DEFAULT_IMAGE_SIZE)), help="WIDTHxHEIGHT (448x336)")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    engines = (
        args.engines.split(",")
        if args.engines
        else ["opencv", *(["rapidocr"] if rapidocr_installed() else [])]
    )
    results = []
    for expert in args.experts.split(","):
        for r in range(args.runs):
            for res in run_once(expert, args.screens, args.seed + r, size, engines, args.jpeg, args.join_gap):
                results.append(res)
                cer = "" if res["cer"] is None else f" cer={res['cer']:.4f} cer_all={res['cer_all']:.4f}"
                print(
                    f"{expert:13s} {res['engine']:8s} seed={res['seed']} screens={res['screens']} "
                    f"lines={res['true_lines']} detections={res['detections']} recall={res['recall']:.3f} "
                    f"precision={res['precision']:.3f} f1={res['f1']:.3f} covered={res['covered']:.3f} "
                    f"on_text={res['on_text']:.3f}{cer} s/image={res['s_per_image']:.3f}",
                    flush=True,
                )
    means: dict = {}
    for r in results:
        means.setdefault(r["expert"], {}).setdefault(r["engine"], []).append(r)
    for by_engine in means.values():
        for engine, rs in by_engine.items():
            by_engine[engine] = {
                k: None if rs[0][k] is None else round(statistics.fmean(x[k] for x in rs), 4)
                for k in MEAN_KEYS
            }
    rapid = means.get("ocr", {}).get("rapidocr")
    bar = None
    if rapid is not None:
        bar = {**BAR, "met": rapid["recall"] >= BAR["recall"] and rapid["cer"] <= BAR["cer"]}
    print(json.dumps({"runs": results, "mean": means, "bar": bar}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
