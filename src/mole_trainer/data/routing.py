"""Building the routing dataset: expert datasets merged, split image-disjointly, sampled, labelled.

Records are grouped by the sha256 of their image bytes (records sharing any image form one group,
even across experts or under different file names), and whole groups go to one split, so no image
straddles train/val/test. Group order comes from the hashes and the seed, never from file order.
Test and val records are taken per expert first; the train split then follows the config's
strategy (`balanced` or `proportional`), per-expert targets or weights, the cap and, with
`oversample`, seeded repeats of train records (repeats never leave the train split), then, with
`augment`, rewritten copies of train records (data/augment.py; train split only too). Images are
stored once, content-addressed (`images/<sha256>.<ext>`), beside the output file, with the label
map (sorted expert names -> 0..K-1), the one source of expert names and indices, and the stats.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from ..config import DatasetConfig, to_dict
from ..errors import UserError
from ..layout import LABEL_MAP_FILE, ROUTING_STATS_SUFFIX, SPLITS
from ..router_prompt import canonical_request
from .augment import AUGMENT_ID, AUGMENT_METADATA, plan_copies
from .conversation import with_router_text
from .formats import load_expert_dataset, sample_to_record
from .records import Sample, decoded_image_digest, write_jsonl

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


def routing_stats_path(output: str | Path) -> Path:
    """The stats JSON written beside a routing JSONL."""
    return Path(output).with_suffix(ROUTING_STATS_SUFFIX)


def build_routing_dataset(cfg: DatasetConfig, output: str | Path, source: str = "dataset config") -> dict:
    """Write the routing JSONL, images, label map and stats; return the stats.

    Every input record is accounted for: kept (train, val or test), dropped as an exact
    duplicate, dropped as a conflict (the same request claimed by two experts) or left unused by
    the train sampling; oversampled repeats and augmented copies are counted apart.
    """
    if not cfg.experts:
        raise UserError(f"{source}: 'experts' lists no expert datasets")
    _check_values(cfg, source)
    output = Path(output)
    per_expert = _load_experts(cfg, source)
    kept, duplicates, conflicts = _drop_duplicates_and_conflicts(per_expert)
    plan = _assign_splits(cfg, per_expert, kept)
    available = {e: len(c) for e, c in plan.candidates.items()}
    targets = _train_targets(cfg, available)
    n_train, warnings = _train_counts(cfg, targets, available)
    picks = _pick_train(cfg, plan.candidates, n_train)
    aug_seed = cfg.seed if cfg.augment.seed is None else cfg.augment.seed
    copies, augmented = _augmented_copies(cfg, kept, plan.candidates, n_train, aug_seed)

    images_dir = output.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    chosen = [i for i, sp in plan.split_of.items() if sp != "train"] + picks.chosen
    entries = [(i, 0, 0, None) for i in chosen] + [(i, r, 0, None) for i, r in picks.repeats]
    entries += [(i, 0, copy, text) for i, copy, text in copies]
    records = [
        _routing_record(kept[i], plan.split_of[i], images_dir, repeat, copy, text)
        for i, repeat, copy, text in entries
    ]
    records.sort(key=lambda r: (SPLITS.index(r["split"]), r["expert"], r["id"]))
    write_jsonl(output, records)
    label_map = make_label_map(list(per_expert))
    (output.parent / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")

    counts = {e: {sp: 0 for sp in SPLITS} for e in per_expert}
    for r in records:
        counts[r["expert"]][r["split"]] += 1
    train_counts = [c["train"] for c in counts.values()]
    stats = {
        "output": str(output),
        "records": len(records),
        "label_map": label_map,
        "strategy": cfg.strategy,
        "oversample": cfg.oversample,
        "seed": cfg.seed,
        "counts": counts,
        "input_records": {e: len(v) for e, v in per_expert.items()},
        "duplicates_dropped": {e: duplicates[e] for e in per_expert},
        "conflicts_dropped": {e: conflicts[e] for e in per_expert},
        "train_available": available,
        "train_targets": targets,
        "unused_for_balance": picks.unused,
        "oversampled": picks.oversampled,
        "augmented": augmented,
        "augment": to_dict(cfg.augment) | {"seed": aug_seed},
        "imbalance_ratio": round(max(train_counts) / min(train_counts), 3) if min(train_counts) else None,
        "image_groups": plan.n_groups,
    }
    warnings += _reconcile_counts(stats, plan.want)
    if warnings:
        stats["warnings"] = warnings
    routing_stats_path(output).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _load_experts(cfg: DatasetConfig, source: str) -> dict[str, list[Sample]]:
    """Every expert's records, all splits together, with names and ids checked."""
    per_expert: dict[str, list[Sample]] = {}
    for name, src in cfg.experts.items():
        validate_expert_name(name, f"{source}: experts.{name}")
        if not src.path:
            raise UserError(f"{source}: experts.{name}.path is missing")
        # images are decoded later, once each, while they are hashed (_drop_duplicates_and_conflicts)
        splits = load_expert_dataset(src.path, decode=False)
        per_expert[name] = [s for split in SPLITS for s in splits[split]]
        if not per_expert[name]:
            raise UserError(f"{source}: experts.{name}: no records in {src.path}")
        _check_unique_ids(per_expert[name], f"{source}: experts.{name}")
    return per_expert


class _SplitPlan(NamedTuple):
    split_of: dict[int, str]  # kept record index -> split
    want: dict[str, dict[str, int]]  # "test"/"val" -> expert -> records asked for
    candidates: dict[str, list[int]]  # expert -> its train records, in the seeded group order
    n_groups: int


def _assign_splits(cfg: DatasetConfig, per_expert: dict, kept: list) -> _SplitPlan:
    """Whole image groups to test, then val, per expert, in the seeded group order; the rest is train."""
    groups = _Groups()
    for _, _, hs in kept:
        groups.union(hs)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, hs) in enumerate(kept):
        by_group[groups.find(hs[0])].append(i)
    order = sorted(by_group, key=lambda g: hashlib.sha256(f"{cfg.seed}:{g}".encode()).hexdigest())
    rank = {g: r for r, g in enumerate(order)}

    # a group goes to a split only while all of its experts want more
    n_kept = {e: 0 for e in per_expert}
    for name, _, _ in kept:
        n_kept[name] += 1
    want = {
        "test": {e: cfg.test_per_expert for e in per_expert},
        "val": {e: cfg.val_wanted(max(n_kept[e] - cfg.test_per_expert, 0)) for e in per_expert},
    }
    have = {split: defaultdict(int) for split in SPLITS}
    split_of: dict[int, str] = {}
    for g in order:
        members = by_group[g]
        experts = {kept[i][0] for i in members}
        split = next(
            (sp for sp in ("test", "val") if all(have[sp][e] < want[sp][e] for e in experts)), "train"
        )
        for i in members:
            split_of[i] = split
            have[split][kept[i][0]] += 1

    candidates: dict[str, list[int]] = {e: [] for e in per_expert}
    for i in sorted(split_of, key=lambda i: (rank[groups.find(kept[i][2][0])], kept[i][1].id)):
        if split_of[i] == "train":
            candidates[kept[i][0]].append(i)
    return _SplitPlan(split_of, want, candidates, len(order))


class _TrainPicks(NamedTuple):
    chosen: list[int]  # train records taken once
    repeats: list[tuple[int, int]]  # (record index, repeat number) of oversampled copies
    unused: dict[str, int]
    oversampled: dict[str, int]


def _pick_train(cfg: DatasetConfig, candidates: dict[str, list[int]], n_train: dict[str, int]) -> _TrainPicks:
    """The first n_train candidates of each expert; past its candidates, seeded repeats of them."""
    chosen: list[int] = []
    repeats: list[tuple[int, int]] = []
    unused = {e: 0 for e in candidates}
    oversampled = {e: 0 for e in candidates}
    for e, cands in candidates.items():
        n = n_train[e]
        chosen.extend(cands[:n])
        unused[e] = max(len(cands) - n, 0)
        if n > len(cands) and cands:
            # seeded order of repeats: every candidate once per round, rounds until the target
            rng = random.Random(f"{cfg.seed}:{e}")
            shuffled = list(cands)
            rng.shuffle(shuffled)
            extra = n - len(cands)
            repeats.extend((shuffled[j % len(cands)], j // len(cands) + 1) for j in range(extra))
            oversampled[e] = extra
    return _TrainPicks(chosen, repeats, unused, oversampled)


def _augmented_copies(
    cfg: DatasetConfig, kept: list, candidates: dict[str, list[int]], n_train: dict[str, int], seed: int
) -> tuple[list[tuple[int, int, str]], dict[str, int]]:
    """Rewritten copies of each expert's distinct train records (AugmentSpec): (index, copy, text)
    triples, and how many per expert."""
    augmented = {e: 0 for e in candidates}
    copies: list[tuple[int, int, str]] = []
    for e, cands in candidates.items():
        train = cands[: n_train[e]]
        planned = plan_copies(
            [f"{e}/{kept[i][1].id}" for i in train],
            [kept[i][1].instruction for i in train],
            cfg.augment,
            seed,
        )
        copies.extend((train[j], copy, text) for j, copy, text in planned)
        augmented[e] = len(planned)
    return copies, augmented


def _routing_record(
    entry: tuple, split: str, images_dir: Path, repeat: int, copy: int, text: str | None
) -> dict:
    """One routing JSONL record of a kept (expert, sample, image hashes) entry; its images copied once,
    content-addressed, into images_dir."""
    name, s, hs = entry
    rel = []
    for p, h in zip(s.images, hs, strict=True):
        dest = images_dir / f"{h}{p.suffix.lower()}"
        if not dest.exists():
            shutil.copyfile(p, dest)
        rel.append(f"images/{dest.name}")
    metadata = {**s.metadata, "source": s.source, "source_id": s.id}
    rid = f"{name}/{s.id}"
    if repeat:
        metadata["oversample_repeat"] = repeat
        rid += f"#repeat{repeat}"
    if copy:
        metadata[AUGMENT_METADATA] = copy
        rid += AUGMENT_ID.format(copy=copy)
    rec_sample = Sample(
        id=rid,
        images=s.images,
        instruction=s.instruction if text is None else text,
        answer=s.answer,
        metadata=metadata,
        expert=name,
        split=split,
        system=s.system,
        # the whole conversation travels with the record; a rewritten copy carries its new text
        turns=s.turns if text is None else with_router_text(s.turns, text),
    )
    return sample_to_record(rec_sample, rel)


def _reconcile_counts(stats: dict, want: dict[str, dict[str, int]]) -> list[str]:
    """Check every input record is accounted for; warnings for short val/test splits and no train records."""
    warnings = []
    counts = stats["counts"]
    for e, n_input in stats["input_records"].items():
        unique = (
            counts[e]["train"]
            - stats["oversampled"][e]
            - stats["augmented"][e]
            + counts[e]["val"]
            + counts[e]["test"]
        )
        lost = stats["duplicates_dropped"][e] + stats["conflicts_dropped"][e] + stats["unused_for_balance"][e]
        if unique + lost != n_input:  # a bug in this module, never a user mistake
            raise RuntimeError(f"routing counts of {e} do not reconcile: {unique} + {lost} != {n_input}")
        short = [sp for sp in ("val", "test") if counts[e][sp] < want[sp][e]]
        if short:
            warnings.append(f"{e}: fewer {'/'.join(short)} records than asked")
    if stats["imbalance_ratio"] is None:
        warnings.append("an expert has no train records (imbalance ratio undefined)")
    return warnings


def _check_values(cfg: DatasetConfig, source: str) -> None:
    """The config's value checks, also for configs built in code rather than loaded from a file."""
    problems = dict(cfg.problems())
    for name, src in cfg.experts.items():
        problems.update({f"experts.{name}.{k}": v for k, v in src.problems().items()})
    if problems:
        raise UserError(f"{source}: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))


def _check_unique_ids(samples: list[Sample], where: str) -> None:
    """Routing ids are '<expert>/<id>', so an id may appear once across an expert's split files."""
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise UserError(f"{where}: id '{s.id}' appears twice ({seen[s.id]} and {s.source})")
        seen[s.id] = s.source


def _drop_duplicates_and_conflicts(
    per_expert: dict[str, list[Sample]],
) -> tuple[list[tuple[str, Sample, list[str]]], dict[str, int], dict[str, int]]:
    """Kept (expert, sample, image hashes) and, per expert, duplicates and conflicts dropped.

    The same router view (image bytes, instruction: conversation.router_request) is one request: kept
    once, and dropped everywhere when two experts claim it (its label would contradict itself). Each
    image file is read once: decoded fully (a UserError naming the record if it does not) and hashed.
    """
    hashes: dict[Path, str] = {}
    duplicates: dict[str, int] = defaultdict(int)
    conflicts: dict[str, int] = defaultdict(int)
    by_request: dict[tuple, list[tuple[str, Sample, list[str]]]] = {}
    for name, samples in per_expert.items():
        for s in samples:
            for i, p in enumerate(s.images):
                if p not in hashes:
                    hashes[p] = decoded_image_digest(p, f"{s.source} (id {s.id}): {s.image_field}[{i}]")
            hs = [hashes[p] for p in s.images]
            key = (tuple(hs), canonical_request(s.instruction))
            claims = by_request.setdefault(key, [])
            if any(n == name for n, _, _ in claims):
                duplicates[name] += 1
            else:
                claims.append((name, s, hs))
    kept = []
    for claims in by_request.values():
        if len(claims) > 1:
            for name, _, _ in claims:
                conflicts[name] += 1
        else:
            kept.append(claims[0])
    return kept, duplicates, conflicts


def _train_targets(cfg: DatasetConfig, available: dict[str, int]) -> dict[str, int]:
    """Train records wanted per expert: strategy share, times weight or replaced by target, capped."""
    out = {}
    for e, src in cfg.experts.items():
        base = cfg.train_share() if cfg.strategy == "balanced" else available[e]
        if src.target is not None:
            t = src.target
        elif src.weight is not None:
            t = int(base * src.weight + 0.5)
        else:
            t = base
        if cfg.max_records_per_expert is not None:
            t = min(t, cfg.max_records_per_expert)
        out[e] = t
    return out


def _train_counts(
    cfg: DatasetConfig, targets: dict[str, int], available: dict[str, int]
) -> tuple[dict[str, int], list[str]]:
    """Train records per expert (repeats included) and warnings about targets not reached.

    With `oversample`, every target is reached (when the expert has any train record). Without,
    `balanced` scales every target by the same factor so that the expert shortest of its target
    fills it with all it has (equal targets stay equal); `proportional` takes what each has.
    """
    warnings = []
    if cfg.oversample:
        counts = {e: t if available[e] else 0 for e, t in targets.items()}
        warnings += [
            f"{e}: no train records to oversample" for e, t in targets.items() if t and not available[e]
        ]
        return counts, warnings
    if cfg.strategy == "balanced":
        scale = min([Fraction(1)] + [Fraction(available[e], t) for e, t in targets.items() if t])
        counts = {e: math.floor(t * scale) for e, t in targets.items()}
        if scale < 1:
            short = min(
                (e for e, t in targets.items() if t), key=lambda e: Fraction(available[e], targets[e])
            )
            warnings.append(
                f"balanced: train targets scaled by {float(scale):.3f} because {short} has "
                f"{available[short]} train records for a target of {targets[short]} "
                "(set oversample: true to repeat records instead)"
            )
        return counts, warnings
    counts = {e: min(t, available[e]) for e, t in targets.items()}
    warnings += [
        f"{e}: {available[e]} train records for a target of {t} (set oversample: true to repeat records)"
        for e, t in targets.items()
        if t > available[e]
    ]
    return counts, warnings


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
