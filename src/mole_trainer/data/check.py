"""`mole data check`: verify a routing dataset folder before any training reads it.

A routing dataset folder holds one or more routing JSONL files, the label map and the images they
name. The check reads every line and collects every violation instead of stopping at the first:

- each line parses as a messages-format record with an `expert` and a `split`, ids are unique;
- the label map maps the expert names to distinct indices 0..K-1 and names every record's expert;
- every image exists inside the folder and decodes (PIL, fully loaded);
- no image, identified by the sha256 of its bytes (whatever its file name), is used in two splits.

Counts that differ from the stats file written beside the data by the builder, and experts of the
label map without train records, are reported as warnings: they do not fail the check.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..errors import UserError
from ..layout import LABEL_MAP_FILE, SPLITS
from .augment import AUGMENT_METADATA
from .records import RecordError, decoded_image_digest, iter_jsonl, parse_record
from .routing import load_label_map, routing_stats_path

MAX_LISTED = 40  # violations spelled out in the error message; the rest are counted
MAX_PLACES = 3  # file:line places listed per split of a leaking image


class DataCheckFailed(UserError):
    """The routing dataset has violations; `report` holds the full check report."""

    def __init__(self, report: dict):
        self.report = report
        super().__init__(format_violations(report))


def check_routing_dataset(path: str | Path) -> dict:
    """Check a routing dataset folder (or one routing JSONL in it); return the report.

    The report holds the folder, the files read, the label map, record counts per expert and
    split, image counts, the numbers of oversampled repeats and augmented copies, `violations` (messages naming the
    file and line, or the image hash and its splits) and `warnings`.
    """
    path = Path(path)
    if path.is_file():
        folder, files = path.parent, [path]
    elif path.is_dir():
        folder, files = path, sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"{path}: no routing .jsonl file in this folder")
    else:
        raise UserError(f"{path}: not found (expected a routing dataset folder or its .jsonl file)")

    violations: list[str] = []
    warnings: list[str] = []
    label_map = None
    try:
        label_map = load_label_map(folder / LABEL_MAP_FILE)
    except UserError as exc:
        violations.append(str(exc))

    image_hash: dict[Path, str | None] = {}  # None: unreadable
    places: dict[str, dict[str, list[str]]] = defaultdict(
        lambda: defaultdict(list)
    )  # hash -> split -> file:line
    counts_by_file: dict[Path, dict[str, dict[str, int]]] = {}
    first_line_of_id: dict[str, str] = {}
    records = repeats = augmented = 0
    for f in files:
        counts = counts_by_file[f] = defaultdict(lambda: {sp: 0 for sp in SPLITS})
        for lineno, obj in iter_jsonl(f):
            where = f"{f}:{lineno}"
            sample = _parse_record(obj, f, lineno, folder, violations)
            if sample is None:
                continue
            records += 1
            if sample.id in first_line_of_id:
                violations.append(
                    f"{where}: duplicate id '{sample.id}' (first at {first_line_of_id[sample.id]})"
                )
            else:
                first_line_of_id[sample.id] = where
            ok = True
            if sample.expert is None:
                violations.append(f"{where}: field 'expert' is missing")
                ok = False
            elif label_map is not None and sample.expert not in label_map:
                violations.append(
                    f"{where}: expert '{sample.expert}' is not in the label map "
                    f"{folder / LABEL_MAP_FILE} ({', '.join(label_map)})"
                )
            if sample.split is None:
                violations.append(f"{where}: field 'split' is missing (one of {', '.join(SPLITS)})")
                ok = False
            if sample.metadata.get("oversample_repeat"):
                repeats += 1
            if sample.metadata.get(AUGMENT_METADATA):
                augmented += 1
                if sample.split not in (None, "train"):
                    violations.append(
                        f"{where}: augmented copy '{sample.id}' in split '{sample.split}' (train only)"
                    )
            for i, p in enumerate(sample.images):
                if p not in image_hash:
                    image_hash[p] = _hash_and_decode(p, f"{where}: images[{i}]", violations)
                h = image_hash[p]
                if h is not None and sample.split is not None:
                    places[h][sample.split].append(where)
            if ok:
                counts[sample.expert][sample.split] += 1

    for h, by_split in sorted(places.items()):
        if len(by_split) > 1:
            splits = [sp for sp in SPLITS if sp in by_split]
            listed = "; ".join(f"{sp}: {_places(by_split[sp])}" for sp in splits)
            violations.append(f"image sha256 {h} is in splits {', '.join(splits)} ({listed})")

    total = _merge_counts(counts_by_file.values())
    for f, counts in counts_by_file.items():
        warnings.extend(_compare_with_stats(f, counts))
    for name in label_map or {}:
        if total.get(name, {}).get("train", 0) == 0:
            warnings.append(f"expert '{name}' of the label map has no train records")
    return {
        "folder": str(folder),
        "files": [str(f) for f in files],
        "label_map": label_map,
        "records": records,
        "counts": total,
        "images": len(image_hash),
        "distinct_images": len({h for h in image_hash.values() if h is not None}),
        "oversampled_repeats": repeats,
        "augmented_copies": augmented,
        "violations": violations,
        "warnings": warnings,
    }


def format_violations(report: dict) -> str:
    """The error message of a failed check: how many violations, then each (up to MAX_LISTED)."""
    v = report["violations"]
    lines = [f"{report['folder']}: {len(v)} violation(s) in the routing dataset:"]
    lines += [f"  {msg}" for msg in v[:MAX_LISTED]]
    if len(v) > MAX_LISTED:
        lines.append(f"  ... and {len(v) - MAX_LISTED} more")
    return "\n".join(lines)


def _parse_record(obj, f: Path, lineno: int, folder: Path, violations: list[str]):
    """One line's record as a Sample, or None after adding its violation (bad UTF-8 or JSON included)."""
    if isinstance(obj, RecordError):
        violations.append(str(obj))
        return None
    try:
        return parse_record(obj, f, lineno, folder, decode=False)
    except UserError as exc:
        violations.append(str(exc))
        return None


def _hash_and_decode(path: Path, where: str, violations: list[str]) -> str | None:
    """sha256 of an image's bytes after decoding it fully; None (and a violation) when it does not decode."""
    try:
        return decoded_image_digest(path, where)
    except UserError as exc:
        violations.append(str(exc))
        return None


def _places(where: list[str]) -> str:
    shown = ", ".join(where[:MAX_PLACES])
    return shown + (f" and {len(where) - MAX_PLACES} more" if len(where) > MAX_PLACES else "")


def _merge_counts(per_file) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for counts in per_file:
        for expert, c in counts.items():
            row = out.setdefault(expert, {sp: 0 for sp in SPLITS})
            for sp in SPLITS:
                row[sp] += c[sp]
    return dict(sorted(out.items()))


def _compare_with_stats(f: Path, counts: dict[str, dict[str, int]]) -> list[str]:
    """Warnings where the builder's stats beside `f` disagree with the records of `f`."""
    stats_file = routing_stats_path(f)
    if not stats_file.is_file():
        return []
    try:
        expected = json.loads(stats_file.read_text())["counts"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{stats_file}: unreadable stats (no 'counts'); not compared"]
    out = []
    for expert in sorted(set(expected) | set(counts)):
        for sp in SPLITS:
            want = expected.get(expert, {}).get(sp, 0)
            have = counts.get(expert, {}).get(sp, 0)
            if want != have:
                out.append(f"{f}: {expert} has {have} {sp} records, {stats_file.name} says {want}")
    return out
