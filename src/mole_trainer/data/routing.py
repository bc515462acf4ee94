"""Building the routing dataset: expert datasets merged, balanced, split image-disjointly, labelled.

Records are grouped by the sha256 of their image bytes (records sharing any image form one group,
even across experts or under different file names), and whole groups go to one split, so no image
straddles train/val/test. Group order comes from the hashes and the seed, never from file order.
Images are stored once, content-addressed (`images/<sha256>.<ext>`), beside the output file, with
the label map (sorted expert names -> 0..K-1), the one source of expert names and indices.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

from ..config import DatasetConfig
from ..errors import UserError
from ..layout import LABEL_MAP_FILE, SPLITS
from .formats import Sample, load_expert_dataset, sample_to_record, write_jsonl

EXPERT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def validate_expert_name(name: str, where: str) -> None:
    """Expert names become adapter names and file names: lowercase letters, digits, '-', '_'."""
    if not EXPERT_NAME.match(name) or name in "lora_":
        raise UserError(
            f"{where}: expert name '{name}' must be lowercase letters, digits, '-' or '_' "
            "(starting with a letter or digit, not a part of 'lora_')"
        )


def make_label_map(names: list[str]) -> dict[str, int]:
    """Stable label map: sorted names -> indices."""
    return {n: i for i, n in enumerate(sorted(names))}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Groups:
    """Union-find over image hashes."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, hashes: list[str]) -> None:
        roots = sorted({self.find(h) for h in hashes})
        for r in roots[1:]:
            self.parent[r] = roots[0]


def build_routing_dataset(cfg: DatasetConfig, output: str | Path, source: str = "dataset config") -> dict:
    """Write the routing JSONL, images, label map and stats; return the stats."""
    if not cfg.experts:
        raise UserError(f"{source}: 'experts' lists no expert datasets")
    output = Path(output)
    per_expert: dict[str, list[Sample]] = {}
    for name, src in cfg.experts.items():
        validate_expert_name(name, f"{source}: experts.{name}")
        if not src.path:
            raise UserError(f"{source}: experts.{name}.path is missing")
        splits = load_expert_dataset(src.path)
        per_expert[name] = [s for split in SPLITS for s in splits[split]]
        if not per_expert[name]:
            raise UserError(f"{source}: experts.{name}: no records in {src.path}")

    hashes: dict[Path, str] = {}
    groups = _Groups()
    duplicates: dict[str, int] = defaultdict(int)
    conflicts: dict[str, int] = defaultdict(int)
    # the same (image, instruction) is one request: kept once, and dropped everywhere when two
    # experts claim it (its label would contradict itself)
    by_request: dict[tuple, list[tuple[str, Sample, list[str]]]] = {}
    for name, samples in per_expert.items():
        for s in samples:
            hs = [hashes.setdefault(p, sha256_file(p)) for p in s.images]
            key = (tuple(hs), " ".join(s.instruction.split()).lower())
            claims = by_request.setdefault(key, [])
            if any(n == name for n, _, _ in claims):
                duplicates[name] += 1
            else:
                claims.append((name, s, hs))
    kept: list[tuple[str, Sample, list[str]]] = []
    for claims in by_request.values():
        if len(claims) > 1:
            for name, _, _ in claims:
                conflicts[name] += 1
            continue
        groups.union(claims[0][2])
        kept.append(claims[0])

    by_group: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, hs) in enumerate(kept):
        by_group[groups.find(hs[0])].append(i)
    order = sorted(by_group, key=lambda g: hashlib.sha256(f"{cfg.seed}:{g}".encode()).hexdigest())

    want = {"test": cfg.test_per_expert, "val": cfg.val_per_expert}
    have = {split: defaultdict(int) for split in SPLITS}
    split_of: dict[int, str] = {}
    for g in order:
        members = by_group[g]
        experts = {kept[i][0] for i in members}
        split = next((sp for sp in ("test", "val") if all(have[sp][e] < want[sp] for e in experts)), "train")
        for i in members:
            split_of[i] = split
            have[split][kept[i][0]] += 1

    # balanced train split: the same number of records for every expert
    available = {e: have["train"][e] for e in per_expert}
    n_train = min(cfg.train_per_expert, *available.values())
    taken: dict[str, int] = defaultdict(int)
    unused: dict[str, int] = defaultdict(int)
    records = []
    images_dir = output.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rank = {g: r for r, g in enumerate(order)}
    for i in sorted(split_of, key=lambda i: (kept[i][0], rank[groups.find(kept[i][2][0])], kept[i][1].id)):
        name, s, hs = kept[i]
        split = split_of[i]
        if split == "train":
            if taken[name] >= n_train:
                unused[name] += 1
                continue
            taken[name] += 1
        rel = []
        for p, h in zip(s.images, hs, strict=True):
            dest = images_dir / f"{h}{p.suffix.lower()}"
            if not dest.exists():
                shutil.copyfile(p, dest)
            rel.append(f"images/{dest.name}")
        rec_sample = Sample(
            id=f"{name}/{s.id}",
            images=s.images,
            instruction=s.instruction,
            answer=s.answer,
            metadata={**s.metadata, "source": s.source, "source_id": s.id},
            expert=name,
            split=split,
        )
        records.append(sample_to_record(rec_sample, rel))
    records.sort(key=lambda r: (SPLITS.index(r["split"]), r["expert"], r["id"]))
    write_jsonl(output, records)
    label_map = make_label_map(list(per_expert))
    (output.parent / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")

    counts = {
        e: {sp: sum(1 for r in records if r["expert"] == e and r["split"] == sp) for sp in SPLITS}
        for e in per_expert
    }
    train_counts = [c["train"] for c in counts.values()]
    stats = {
        "output": str(output),
        "records": len(records),
        "label_map": label_map,
        "counts": counts,
        "input_records": {e: len(v) for e, v in per_expert.items()},
        "duplicates_dropped": {e: duplicates[e] for e in per_expert},
        "conflicts_dropped": {e: conflicts[e] for e in per_expert},
        "unused_for_balance": {e: unused[e] for e in per_expert},
        "imbalance_ratio": round(max(train_counts) / max(min(train_counts), 1), 3),
        "image_groups": len(order),
        "seed": cfg.seed,
    }
    for e in per_expert:
        short = [sp for sp in ("val", "test") if counts[e][sp] < want[sp]]
        if short:
            stats.setdefault("warnings", []).append(f"{e}: fewer {'/'.join(short)} records than asked")
    output.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def load_label_map(path: str | Path) -> dict[str, int]:
    """Read and check a label map file (name -> 0..K-1)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: label map not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    indices = list(data.values()) if isinstance(data, dict) else []
    if (
        not isinstance(data, dict)
        or not all(type(i) is int for i in indices)
        or sorted(indices) != list(range(len(data)))
    ):
        raise UserError(f"{path}: a label map must map each expert name to a distinct index 0..K-1")
    return data
