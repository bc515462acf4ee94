"""OCR crops: cut text lines out of screens and documents into an OCR expert dataset.

Input is an expert dataset folder (train/val/test.jsonl + images) or a folder of images. A record whose
metadata carries its text lines and their pixel boxes (``lines`` + ``boxes``, as the synthetic ``ocr``
expert writes) is cropped at those boxes and each crop is labelled with its line. Any other image goes
through a text-line engine (data/ocr_engines.py): ``rapidocr`` (PP-OCRv4, the default when installed)
reads each line's text with a confidence, and lines at or above ``min_confidence`` become training
records; ``opencv`` (the classical detector of data/ocr_detector.py, OpenCV morphology + connected
components) finds boxes only. Crops without a trusted text are written as requests to ``unlabeled.jsonl``
(``mole infer --input DIR/unlabeled.jsonl --expert ocr`` reads it as it is).

Splits: a dataset's records keep their split; the images of a folder are split by image content
(``split_images``), so no source image, nor two copies of one, straddles two splits.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..hashing import sha256_file
from ..layout import OCR_SUMMARY_FILE, OCR_UNLABELED_FILE, SPLITS
from .formats import load_expert_dataset
from .ocr_detector import Box, DetectorParams
from .ocr_engines import DEFAULT_JOIN_GAP, DEFAULT_MIN_CONFIDENCE, check_engine, load_image, read_text_lines
from .records import write_jsonl

# The one OCR request: every crop asks it, and the synthetic ocr expert asks it among its prompts.
OCR_PROMPT = "Read the text in the image."
OCR_TASK = "ocr"  # metadata.task of the crops (eval/task_metrics.py scores it by character similarity)
DEFAULT_PADDING = 4
# share of an image folder's (distinct) images that become val and test crops; the rest are train
FOLDER_SPLIT_SHARES = {"val": 0.1, "test": 0.1}


# ---------------------------------------------------------------------------------------------------------
# crops

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class _Source:
    """One image to crop: where it is, what split it belongs to and its known text lines (None: detect)."""

    path: Path
    rel: str  # relative to the input root, with '/'
    split: str | None
    record_id: str | None
    known: list[tuple[Box, str]] | None
    where: str


def known_text_lines(metadata: dict, where: str) -> list[tuple[Box, str]] | None:
    """(box, text) of every text line a record's metadata gives, or None when it gives none.

    Lines are known when metadata has ``lines`` (strings) and ``boxes`` ([x0, y0, x1, y1] pixels) of the
    same length, as the synthetic ocr expert writes; other ``boxes`` (widgets, chart marks) do not count.
    """
    lines, boxes = metadata.get("lines"), metadata.get("boxes")
    if not isinstance(lines, list) or not isinstance(boxes, list):
        return None
    if len(lines) != len(boxes):
        raise UserError(
            f"{where}: metadata has {len(lines)} 'lines' but {len(boxes)} 'boxes'; expected one box per line"
        )
    out = []
    for i, (text, box) in enumerate(zip(lines, boxes, strict=True)):
        if not isinstance(text, str):
            raise UserError(f"{where}: metadata.lines[{i}] must be a string")
        if (
            not isinstance(box, list | tuple)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            or box[2] <= box[0]
            or box[3] <= box[1]
        ):
            raise UserError(
                f"{where}: metadata.boxes[{i}] must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box!r}"
            )
        out.append((tuple(round(v) for v in box), text))
    return out


def pad_box(box: Box, padding: int, width: int, height: int) -> Box:
    """The box grown by `padding` pixels on every side, clamped to a width x height image."""
    return (
        max(0, box[0] - padding),
        max(0, box[1] - padding),
        min(width, box[2] + padding),
        min(height, box[3] + padding),
    )


def make_ocr_crops(
    input: str | Path,
    output: str | Path,
    padding: int = DEFAULT_PADDING,
    boxes_out: str | Path | None = None,
    params: DetectorParams | None = None,
    engine: str | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    join_gap: float = DEFAULT_JOIN_GAP,
) -> dict:
    """Cut the text lines of an expert dataset or an image folder into an OCR dataset in `output`.

    Dataset input keeps each record's split, image-folder input is split by split_images (so crops of
    one source image stay in one split). Crops with known text, or text read by `engine` (None: the
    default, rapidocr when installed) with confidence >= `min_confidence`, go to
    output/{train,val,test}.jsonl as OCR records; the others to output/unlabeled.jsonl as {"id", "image",
    "prompt", "split", "metadata"} requests. Crops are PNGs in output/images/. `boxes_out` gets one JSONL
    row per box. Unreadable images in an image folder are skipped and listed. Returns the summary also
    written to output/ocr_crops.json.
    """
    _check_crop_options(padding, min_confidence, join_gap)
    engine = check_engine(engine)
    params = params or DetectorParams()
    root, out = Path(input), Path(output)
    sources, mode = _sources(root)
    _prepare_output(out, root)
    (out / "images").mkdir(parents=True)

    crops = _Crops(out, padding, engine, min_confidence)
    skipped: list[dict] = []
    counts = {"known": 0, "detected": 0, "without_text": 0, "blank_lines": 0}
    shas = _hash_sources(sources, skipped)
    if mode == "images":
        split_of = split_images(shas)
        for src in sources:
            src.split = split_of.get(src.rel)
    for src in sources:
        if src.rel not in shas:  # unreadable: already skipped
            continue
        try:
            image = load_image(src.path)
        except Exception as exc:  # a folder of images may hold a broken file: skip it, say so
            skipped.append({"image": src.rel, "reason": f"cannot be decoded ({type(exc).__name__}: {exc})"})
            continue
        if src.known is not None:
            counts["known"] += 1
            lines = _known_lines(src, image.size, counts)
        else:
            counts["detected"] += 1
            found = read_text_lines(image, engine, params, join_gap)
            lines = [(ln.box, ln.text, ln.confidence, "detected") for ln in found]
            counts["without_text"] += not lines
        crops.add(src, shas[src.rel], image, lines)
    if mode == "dataset" or any(crops.splits.values()):
        for split, records in crops.splits.items():
            write_jsonl(out / f"{split}.jsonl", records)
    write_jsonl(out / OCR_UNLABELED_FILE, crops.unlabeled)
    if boxes_out is not None:
        write_jsonl(boxes_out, crops.box_rows)
    summary = {
        "input": str(root),
        "output": str(out),
        "mode": mode,
        "padding": padding,
        "prompt": OCR_PROMPT,
        "images": len(sources),
        "images_known_boxes": counts["known"],
        "images_detected": counts["detected"],
        "images_skipped": len(skipped),
        "images_detected_without_text": counts["without_text"],
        "blank_lines_skipped": counts["blank_lines"],
        "crops": {**{s: len(r) for s, r in crops.splits.items()}, "unlabeled": len(crops.unlabeled)},
        "engine": engine,
        "min_confidence": min_confidence,
        "join_gap": join_gap,
        "lines_below_confidence": crops.below_confidence,
        "boxes_out": None if boxes_out is None else str(boxes_out),
        "skipped": skipped,
        "detector": asdict(params),
    }
    assert summary["images"] == counts["known"] + counts["detected"] + len(skipped)
    (out / OCR_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_crop_options(padding, min_confidence, join_gap) -> None:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise UserError(f"padding must be a whole number of pixels >= 0, got {padding!r}")
    if (
        isinstance(min_confidence, bool)
        or not isinstance(min_confidence, int | float)
        or not 0 <= min_confidence <= 1
    ):
        raise UserError(f"min_confidence must be a number from 0 to 1, got {min_confidence!r}")
    if isinstance(join_gap, bool) or not isinstance(join_gap, int | float) or join_gap < 0:
        raise UserError(f"join_gap must be a number of text heights >= 0, got {join_gap!r}")


def _hash_sources(sources: list[_Source], skipped: list[dict]) -> dict[str, str]:
    """sha256 of each readable source image by its relative name; an unreadable one is listed in skipped."""
    shas: dict[str, str] = {}
    for src in sources:
        try:
            shas[src.rel] = sha256_file(src.path)
        except OSError as exc:  # unreadable (permissions, vanished): skipped and listed like a broken image
            skipped.append({"image": src.rel, "reason": f"cannot be read ({type(exc).__name__}: {exc})"})
    return shas


def _known_lines(src: _Source, size: tuple[int, int], counts: dict) -> list[tuple]:
    """A record's own (box, text) lines, boxes clamped to the image; blank lines counted and left out."""
    lines = []
    for i, (box, text) in enumerate(src.known):
        clamped = pad_box(box, 0, *size)
        if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
            raise UserError(
                f"{src.where}: metadata.boxes[{i}] {list(box)} lies outside the {size[0]}x{size[1]} image"
            )
        if not text.strip():
            counts["blank_lines"] += 1
            continue
        lines.append((clamped, text, None, "known"))
    return lines


@dataclass
class _Crops:
    """The crops of make_ocr_crops as they are cut: labeled records per split, unlabeled requests and
    one box row per crop."""

    out: Path
    padding: int
    engine: str
    min_confidence: float
    splits: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    unlabeled: list[dict] = field(default_factory=list)
    box_rows: list[dict] = field(default_factory=list)
    used_ids: set[str] = field(default_factory=set)
    below_confidence: int = 0

    def add(self, src: _Source, sha: str, image, lines: list[tuple]) -> None:
        """Cut and save each (box, text, confidence, origin) line of one source image."""
        base = _safe_id(src.record_id if src.record_id is not None else src.rel.rsplit(".", 1)[0])
        for k, (box, text, confidence, origin) in enumerate(lines):
            crop_id = _unique(f"{base}-{k:03d}", self.used_ids)
            crop_box = pad_box(box, self.padding, *image.size)
            rel = f"images/{crop_id}.png"
            image.crop(crop_box).save(self.out / rel, format="PNG")
            meta = {
                "task": OCR_TASK,
                "source_image": src.rel,
                "source_sha256": sha,
                "source_id": src.record_id,
                "text_box": list(box),
                "crop_box": list(crop_box),
                "padding": self.padding,
                "box_origin": origin,
                "engine": None if origin == "known" else self.engine,
                "confidence": confidence,
                "source_size": list(image.size),
            }
            target = self._file_record(crop_id, rel, text, confidence, origin, src.split, meta)
            self.box_rows.append(
                {
                    "crop_id": crop_id,
                    "file": target,
                    "source_image": src.rel,
                    "source_sha256": sha,
                    "split": src.split,
                    "text_box": list(box),
                    "crop_box": list(crop_box),
                    "text": text,
                    "confidence": confidence,
                    "origin": origin,
                }
            )

    def _file_record(self, crop_id, rel, text, confidence, origin, split, meta) -> str:
        """A trusted text makes a labeled record of the split, anything else an unlabeled request;
        the name of the file it goes to."""
        trusted = origin == "known" or (
            confidence is not None and confidence >= self.min_confidence and bool(text and text.strip())
        )
        if trusted:
            self.splits[split or "train"].append(_labeled_record(crop_id, rel, text, meta))
            return f"{split or 'train'}.jsonl"
        self.below_confidence += confidence is not None
        if text is not None:
            meta["recognised_text"] = text  # kept for review; not a training target
        self.unlabeled.append(
            {"id": crop_id, "image": rel, "prompt": OCR_PROMPT, "split": split, "metadata": meta}
        )
        return OCR_UNLABELED_FILE


def split_images(shas: dict[str, str]) -> dict[str, str]:
    """The split of each image (name -> sha256): distinct contents ordered by their hash, the first
    FOLDER_SPLIT_SHARES of them (rounded, none for a folder of a few images) test and val, the rest train;
    copies of one image share its split. Stable: the same folder always splits the same way."""
    distinct = sorted(set(shas.values()))
    n = len(distinct)
    n_test, n_val = (round(FOLDER_SPLIT_SHARES[s] * n) for s in ("test", "val"))
    split_of_sha = {
        sha: "test" if i < n_test else "val" if i < n_test + n_val else "train"
        for i, sha in enumerate(distinct)
    }
    return {name: split_of_sha[sha] for name, sha in shas.items()}


def _labeled_record(crop_id: str, rel: str, text: str, metadata: dict) -> dict:
    return {
        "id": crop_id,
        "images": [rel],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]},
            {"role": "assistant", "content": text},
        ],
        "metadata": metadata,
    }


def _sources(root: Path) -> tuple[list[_Source], str]:
    """The images to crop and the input's kind: 'dataset' (split files) or 'images' (a folder of images)."""
    if not root.exists():
        raise UserError(f"{root}: input not found (expected an expert dataset folder or a folder of images)")
    if not root.is_dir():
        raise UserError(
            f"{root}: input must be a folder (an expert dataset or a folder of images), not a file"
        )
    base = root.resolve()
    if any((root / f"{s}.jsonl").is_file() for s in SPLITS):
        sources = []
        for split, samples in load_expert_dataset(root).items():
            for s in samples:
                known = known_text_lines(s.metadata, s.source) if len(s.images) == 1 else None
                for j, path in enumerate(s.images):
                    rid = s.id if len(s.images) == 1 else f"{s.id}-image{j}"
                    sources.append(
                        _Source(path, path.relative_to(base).as_posix(), split, rid, known, s.source)
                    )
        return sources, "dataset"
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) and no train/val/test.jsonl; "
            "expected an expert dataset folder or a folder of images"
        )
    return [_Source(p, p.relative_to(root).as_posix(), None, None, None, str(p)) for p in paths], "images"


def _prepare_output(out: Path, root: Path) -> None:
    """Refuse an output inside the input or a non-empty folder; replace an earlier ocr-crops output."""
    import shutil

    o, r = out.resolve(), root.resolve()
    if o == r or o.is_relative_to(r):
        raise UserError(f"{out}: the output folder must not be the input folder {root} or lie inside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / OCR_SUMMARY_FILE).is_file():
            raise UserError(
                f"{out}: output folder is not empty and is not an earlier ocr-crops output "
                f"(no {OCR_SUMMARY_FILE}); choose an empty or new folder"
            )
        shutil.rmtree(out / "images", ignore_errors=True)
        for name in (*(f"{s}.jsonl" for s in SPLITS), OCR_UNLABELED_FILE, OCR_SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _unique(name: str, used: set[str]) -> str:
    out, n = name, 1
    while out in used:
        n += 1
        out = f"{name}-{n}"
    used.add(out)
    return out


def format_ocr_summary(summary: dict) -> str:
    """A few lines for the terminal: images, crops per file, skipped images, where to go next."""
    out, crops = summary["output"], summary["crops"]
    lines = [
        f"ocr crops from {summary['images']} image(s) of {summary['input']}: "
        f"{summary['images_known_boxes']} with known text lines, {summary['images_detected']} through the "
        f"{summary['engine']} engine ({summary['images_detected_without_text']} without any text found), "
        f"{summary['images_skipped']} skipped"
    ]
    if summary["mode"] == "dataset" or any(crops[s] for s in SPLITS):
        labeled = ", ".join(f"{s} {crops[s]}" for s in SPLITS)
        lines.append(f"  labeled crops (training records): {labeled} -> {out}/{{{','.join(SPLITS)}}}.jsonl")
    why = "text unknown"
    if summary["lines_below_confidence"]:
        why += f" or read with confidence < {summary['min_confidence']}: {summary['lines_below_confidence']}"
    lines.append(
        f"  unlabeled crops: {crops['unlabeled']} -> {out}/{OCR_UNLABELED_FILE} ({why}; not training "
        f"targets until labelled, e.g. mole infer --input {out}/{OCR_UNLABELED_FILE} --expert ocr)"
    )
    if summary["blank_lines_skipped"]:
        lines.append(f"  known lines with blank text skipped: {summary['blank_lines_skipped']}")
    for s in summary["skipped"]:
        lines.append(f"  skipped {s['image']}: {s['reason']}")
    if summary["boxes_out"]:
        lines.append(f"  boxes: {summary['boxes_out']}")
    return "\n".join(lines)
