"""Benchmark: parallel preprocessing (`mole data preprocess --workers N`) against one worker, same
records, on the tiny offline Qwen3-VL's processor.

Synthesises RECORDS GUI screens of 640x480 (the four synthetic experts), then preprocesses them
with each worker count in turn, REPEATS times (alternating the order). Every run is a fresh
process, as a `mole data preprocess` command is: imports, the first processor load and reading
the records are done before the clock starts; the timed part is preprocess_splits whole
(processor load, pool start, encoding, writing the shards). The outputs of every worker count are
checked to be byte-identical. The pixel budget is the demo router's (packaged router.yaml) unless
--max-pixels.

Beside each run it reports the CPU seconds used (this run's process and its workers) and the share
of a core other processes took meanwhile (from /proc/stat); before and after, a pure-Python loop
in 1 and 2 processes gives the scaling the machine itself allows at that moment.

Usage: python bench/preprocess.py [--records N] [--repeats R] [--workers 1,2] [--max-pixels P]
The last line printed is one JSON object: medians, samples_per_s_<n> and scaling (2 vs 1 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGE_SIZE = (640, 480)


def demo_pixel_budget() -> tuple[int, int]:
    """(min_pixels, max_pixels) of the packaged router.yaml: the budget the demo preprocesses with."""
    import yaml

    from mole_trainer.configs import default_text

    image = yaml.safe_load(default_text("router.yaml"))["image"]
    return image["min_pixels"], image["max_pixels"]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have been waited for."""
    import resource

    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def system_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_ceiling(repeats: int, n: int = 5_000_000) -> float:
    """Speed of 2 processes over 1 on a pure-Python loop (pool started beforehand), median.

    About 2 on two free cores; less when other work shares them.
    """
    import multiprocessing as mp

    ratios = []
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_spin, [1, 1])
        for _ in range(repeats):
            t = time.perf_counter()
            _spin(n)
            _spin(n)
            one = time.perf_counter() - t
            t = time.perf_counter()
            pool.map(_spin, [n, n], chunksize=1)
            ratios.append(one / (time.perf_counter() - t))
    return statistics.median(ratios)


def load_samples(data: Path, records: int) -> list:
    from mole_trainer.data.formats import load_expert_dataset
    from mole_trainer.data.synth import SYNTH_EXPERTS

    samples = [s for e in SYNTH_EXPERTS for s in load_expert_dataset(data / e, decode=False)["train"]]
    return samples[:records]


def one_run(args) -> None:
    """Child mode: preprocess once with --one workers and print {wall, cpu, others} as JSON."""
    from mole_trainer.data.preprocess import preprocess_splits
    from mole_trainer.model.loading import load_processor

    load_processor(args.model)  # imports and first load: paid once per command, not timed
    splits = {"train": load_samples(Path(args.data), args.records), "val": [], "test": []}
    busy, cpu, t = system_busy_seconds(), cpu_seconds(), time.perf_counter()
    preprocess_splits(
        splits, args.out, args.model, "sft", None, args.min_pixels, args.max_pixels, workers=args.one
    )
    wall, used = time.perf_counter() - t, cpu_seconds() - cpu
    others = None if busy is None else max(0.0, system_busy_seconds() - busy - used) / wall
    print(json.dumps({"wall": wall, "cpu": used, "others": others, "records": len(splits["train"])}))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.pt"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (first is the baseline)")
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    for hidden in ("--one", "--data", "--model", "--out", "--min-pixels"):  # child mode
        ap.add_argument(
            hidden, type=int if hidden in ("--one", "--min-pixels") else str, help=argparse.SUPPRESS
        )
    args = ap.parse_args()
    if args.one:
        return one_run(args)
    counts = [int(x) for x in args.workers.split(",")]

    from mole_trainer.data.synth import SYNTH_EXPERTS, synthesize
    from mole_trainer.model.tiny import build_tiny_model

    root = Path(args.dir or tempfile.mkdtemp(prefix="mole-bench-prep-"))
    min_pixels, max_pixels = demo_pixel_budget()
    max_pixels = args.max_pixels or max_pixels
    try:
        model = str(build_tiny_model(root / "model"))
        per_expert = -(-args.records // len(SYNTH_EXPERTS))
        t = time.perf_counter()
        synthesize(root / "data", SYNTH_EXPERTS, {"train": per_expert, "val": 0, "test": 0}, 0, IMAGE_SIZE)
        synth_s = time.perf_counter() - t

        def run(n: int) -> dict:
            out = root / f"out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--one", str(n), "--data", str(root / "data"), "--model", model]
            cmd += ["--out", str(out), "--records", str(args.records)]
            cmd += ["--min-pixels", str(min_pixels), "--max-pixels", str(max_pixels)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            return json.loads(res.stdout.strip().splitlines()[-1])

        ceiling_before = machine_ceiling(args.repeats)
        runs: dict[int, list[dict]] = {n: [] for n in counts}
        for r in range(args.repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                x = run(n)
                runs[n].append(x)
                others = "" if x["others"] is None else f", other processes {x['others']:.0%} of a core"
                print(
                    f"repeat {r}: {n} worker(s) {x['wall']:.2f} s wall, {x['cpu']:.2f} s CPU{others}",
                    flush=True,
                )
        ceiling_after = machine_ceiling(args.repeats)
        baseline = shard_bytes(root / f"out-{counts[0]}")
        identical = all(shard_bytes(root / f"out-{n}") == baseline for n in counts[1:])
        size_mb = sum(len(b) for b in baseline.values()) / 2**20
        n_rec = runs[counts[0]][0]["records"]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    result = {
        "records": n_rec,
        "image_size": list(IMAGE_SIZE),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "synth_s": round(synth_s, 2),
        "cache_mb": round(size_mb, 1),
        "identical_outputs": identical,
        "machine_ceiling_2": [round(ceiling_before, 3), round(ceiling_after, 3)],
    }
    for n in counts:
        med = statistics.median(x["wall"] for x in runs[n])
        result[f"seconds_{n}"] = round(med, 3)
        result[f"samples_per_s_{n}"] = round(n_rec / med, 1)
        result[f"cpu_seconds_{n}"] = round(statistics.median(x["cpu"] for x in runs[n]), 3)
        if all(x["others"] is not None for x in runs[n]):  # share of a core other processes took
            result[f"others_core_share_{n}"] = round(statistics.median(x["others"] for x in runs[n]), 2)
    if 1 in counts and 2 in counts:
        result["scaling"] = round(result["samples_per_s_2"] / result["samples_per_s_1"], 3)
    print(f"{n_rec} records of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, max_pixels {max_pixels}:")
    for n in counts:
        print(f"  {n} worker(s): {result[f'samples_per_s_{n}']} samples/s (median of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
