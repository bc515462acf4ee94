"""Benchmark: reads of each image by `mole data routing` (+ the demo's `mole data check`), one read per
image for the decode check and the hash against the previous separate decode and hash reads.

Synthesises the four synthetic expert datasets (the demo's sizes by default), writes the demo's
dataset.yaml for them, then runs the real stages (stages.data_routing, then stages.data_check as the
demo's routing stage does) both ways in this process, alternating, REPEATS times each:
- before (baseline): the previous reading, restored by swapping three module functions: the
  records loaded with every image decoded, then each image hashed apart (routing), and each
  output image decoded then hashed (check);
- after: the code as it is (load without decoding; each image read once, decoded from memory and hashed).
It counts every open() of an image file by what opened it and every full decode, checks that both
ways write byte-identical outputs (routing JSONL, label map, stats, images/), and reports medians
of the wall time.

Usage: python bench/routing_reads.py [--train N --val N --test N] [--repeats R] [--workdir DIR]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import contextlib
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def counted(counts: collections.Counter):
    """Count open() calls on image files (.png/.jpg) by the function that made them, and full decodes."""
    import sys

    from mole_trainer.data import records

    real_open, real_decode = builtins.open, records._decoded_size

    def spy(file, *args, **kwargs):
        if isinstance(file, str | Path) and Path(file).suffix.lower() in (".png", ".jpg", ".jpeg"):
            caller = sys._getframe(1)
            counts[f"open by {Path(caller.f_code.co_filename).stem}.{caller.f_code.co_name}"] += 1
        return real_open(file, *args, **kwargs)

    def decode(*args):
        counts["decode"] += 1
        return real_decode(*args)

    builtins.open = io.open = spy
    records._decoded_size = decode
    try:
        yield
    finally:
        builtins.open = io.open = real_open
        records._decoded_size = real_decode


@contextlib.contextmanager
def previous_reading():
    """The reading before this change: decode while loading, then hash (routing); decode, then hash (check)."""
    from mole_trainer.data import check, formats, records, routing
    from mole_trainer.hashing import sha256_file

    saved = (routing.load_expert_dataset, routing.decoded_image_digest, check.decoded_image_digest)
    routing.load_expert_dataset = lambda path, decode=True: formats.load_expert_dataset(path)
    routing.decoded_image_digest = lambda path, where: sha256_file(path)
    check.decoded_image_digest = lambda path, where: (records.check_image(path, where), sha256_file(path))[1]
    try:
        yield
    finally:
        routing.load_expert_dataset, routing.decoded_image_digest, check.decoded_image_digest = saved


def run_once(config: Path, out_dir: Path, workdir: Path) -> tuple[float, dict, int]:
    """(seconds, {stage: opens and decodes}, output images) of one routing + check run into a fresh out_dir."""
    from mole_trainer import stages

    shutil.rmtree(out_dir, ignore_errors=True)
    counts = {"routing": collections.Counter(), "check": collections.Counter()}
    start = time.perf_counter()
    with counted(counts["routing"]):
        stages.data_routing(config, out_dir / "routing.jsonl", workdir)
    with counted(counts["check"]):
        report = stages.data_check(out_dir, workdir)
    seconds = time.perf_counter() - start
    assert report["violations"] == [], report["violations"][:3]
    return seconds, counts, len(list((out_dir / "images").iterdir()))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes by name; the stats without the output path (it names the folder)."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.name.endswith(".stats.json"):
            stats = json.loads(data)
            stats.pop("output")
            data = json.dumps(stats, sort_keys=True).encode()
        out[str(f.relative_to(folder))] = data
    return out


def main() -> None:
    import yaml

    from mole_trainer.configs import default_text
    from mole_trainer.data.synth import SYNTH_EXPERTS, synthesize
    from mole_trainer.pipeline import DEMO_SEED, DEMO_SYNTH_COUNTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for split in ("train", "val", "test"):
        parser.add_argument(f"--{split}", type=int, default=DEMO_SYNTH_COUNTS[split])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="routing-reads-"))
    counts = {"train": args.train, "val": args.val, "test": args.test}
    synthesize(root / "experts", SYNTH_EXPERTS, counts, DEMO_SEED)
    cfg = yaml.safe_load(default_text("dataset.yaml"))
    cfg["experts"] = {name: {"path": str(root / "experts" / name)} for name in SYNTH_EXPERTS}
    config = root / "dataset.yaml"
    config.write_text(yaml.safe_dump(cfg))
    inputs = sum(1 for _ in (root / "experts").rglob("*.png"))

    seconds: dict[str, list[float]] = {"before": [], "after": []}
    opens: dict[str, dict] = {}
    outputs: dict[str, int] = {}
    for r in range(args.repeats):
        for way in ("before", "after") if r % 2 == 0 else ("after", "before"):  # no side always first
            with previous_reading() if way == "before" else contextlib.nullcontext():
                s, opens[way], outputs[way] = run_once(config, root / way, root / "wd")
            seconds[way].append(s)
    identical = folder_bytes(root / "before") == folder_bytes(root / "after")
    result = {"input_images": inputs, "output_images": outputs["after"]}
    for way in ("before", "after"):
        for stage, c in opens[way].items():
            reads = sum(n for k, n in c.items() if k.startswith("open") and "copyfile" not in k)
            print(f"{way} {stage}: {reads} reads (copies apart), {c['decode']} decodes: {dict(c)}")
            result[f"{stage}_{way}"] = dict(c)
    result |= {
        "outputs_byte_identical": identical,
        "seconds_median_before": round(statistics.median(seconds["before"]), 3),
        "seconds_median_after": round(statistics.median(seconds["after"]), 3),
        "repeats": args.repeats,
    }
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
