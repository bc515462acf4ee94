"""Benchmark: parallel preprocessing (`mole data preprocess --workers N`) against one worker, same
process, same records, on the tiny offline Qwen3-VL's processor.

Synthesises RECORDS GUI screens of 640x480 (the four synthetic experts), then runs
preprocess_splits with each worker count in turn, REPEATS times (alternating the order), after one
untimed warm-up run (imports, first processor load). Each run is timed whole: processor load,
pool start, encoding, writing the shards. The outputs of every worker count are checked to be
identical. The pixel budget is the demo router's (packaged router.yaml) unless --max-pixels.
A pure-Python loop in 1 and 2 processes, before and after, gives the ceiling the machine allows
at that moment (other work on the same cores lowers it).

Usage: python bench/preprocess.py [--records N] [--repeats R] [--workers 1,2] [--max-pixels P]
The last line printed is one JSON object: medians, samples_per_s_<n> and scaling (2 vs 1 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def machine_ceiling(repeats: int, n: int = 3_000_000) -> float:
    """Throughput of 2 processes over 1 on a pure-Python loop: what the cores give right now.

    A figure well under 2 means the two cores are not both ours (other work, shared physical cores);
    preprocessing cannot scale better than this.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ratios = []
    for _ in range(repeats):
        t = time.perf_counter()
        _spin(n)
        _spin(n)
        one = time.perf_counter() - t
        t = time.perf_counter()
        with ctx.Pool(2) as pool:
            pool.map(_spin, [n, n])
        ratios.append(one / (time.perf_counter() - t))
    return statistics.median(ratios)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.pt"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (first is the baseline)")
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]

    from mole_trainer.data.formats import load_expert_dataset
    from mole_trainer.data.preprocess import preprocess_splits
    from mole_trainer.data.synth import SYNTH_EXPERTS, synthesize
    from mole_trainer.model.tiny import build_tiny_model

    root = Path(args.dir or tempfile.mkdtemp(prefix="mole-bench-prep-"))
    try:
        model = str(build_tiny_model(root / "model"))
        per_expert = -(-args.records // len(SYNTH_EXPERTS))
        t = time.perf_counter()
        synthesize(root / "data", SYNTH_EXPERTS, {"train": per_expert, "val": 0, "test": 0}, 0, IMAGE_SIZE)
        synth_s = time.perf_counter() - t
        samples = [s for e in SYNTH_EXPERTS for s in load_expert_dataset(root / "data" / e)["train"]]
        splits = {"train": samples[: args.records], "val": [], "test": []}
        min_pixels, max_pixels = demo_pixel_budget()
        max_pixels = args.max_pixels or max_pixels

        def run(n: int, out: Path) -> tuple[float, float, float | None]:
            """(wall s, CPU s of this process and its children, CPU s other processes used meanwhile)."""
            shutil.rmtree(out, ignore_errors=True)
            busy, cpu, t = system_busy_seconds(), cpu_seconds(), time.perf_counter()
            preprocess_splits(splits, out, model, "sft", None, min_pixels, max_pixels, workers=n)
            wall, used = time.perf_counter() - t, cpu_seconds() - cpu
            others = None if busy is None else max(0.0, system_busy_seconds() - busy - used)
            return wall, used, others

        run(counts[0], root / "warmup")  # imports and first processor load, excluded from timings
        ceiling_before = machine_ceiling(args.repeats)
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        cpu: dict[int, list[float]] = {n: [] for n in counts}
        others: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                wall, used, other = run(n, root / f"out-{n}")
                seconds[n].append(wall)
                cpu[n].append(used)
                if other is not None:
                    others[n].append(other / wall)
                print(
                    f"repeat {r}: {n} worker(s) {wall:.2f} s wall, {used:.2f} s CPU"
                    + ("" if other is None else f", other processes {other / wall:.0%} of a core"),
                    flush=True,
                )
        ceiling_after = machine_ceiling(args.repeats)
        baseline = shard_bytes(root / f"out-{counts[0]}")
        identical = all(shard_bytes(root / f"out-{n}") == baseline for n in counts[1:])
        size_mb = sum(len(b) for b in baseline.values()) / 2**20
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    n_rec = len(splits["train"])
    result = {
        "records": n_rec,
        "image_size": list(IMAGE_SIZE),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "synth_s": round(synth_s, 2),
        "cache_mb": round(size_mb, 1),
        "identical_outputs": identical,
        # 2-process vs 1-process speed of a pure-Python loop, measured before and after the runs
        "machine_ceiling_2": [round(ceiling_before, 3), round(ceiling_after, 3)],
    }
    for n in counts:
        med = statistics.median(seconds[n])
        result[f"seconds_{n}"] = round(med, 3)
        result[f"samples_per_s_{n}"] = round(n_rec / med, 1)
        result[f"cpu_seconds_{n}"] = round(statistics.median(cpu[n]), 3)
        if others[n]:  # share of one core other processes took during these runs (median)
            result[f"others_core_share_{n}"] = round(statistics.median(others[n]), 2)
    if 1 in counts and 2 in counts:
        result["scaling"] = round(result["samples_per_s_2"] / result["samples_per_s_1"], 3)
    print(f"{n_rec} records of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, max_pixels {max_pixels}:")
    for n in counts:
        print(f"  {n} worker(s): {result[f'samples_per_s_{n}']} samples/s (median of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
