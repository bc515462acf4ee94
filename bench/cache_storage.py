"""Benchmark: the compact cache storage (resized uint8 pixels, zlib) against the float32 storage it replaced.

Synthesises RECORDS GUI screens (the four synthetic experts, SIZE pixels), encodes each as a router
example with the tiny offline Qwen3-VL's processor (or --processor DIR, e.g. the real Qwen3-VL-8B
processor folder in tests/fixtures), and stores it both ways in the same process:
- float32 (the baseline, cache format v2): the processor's pixel_values with the temporal copies
  taken out, int64 token tensors;
- compact (format v3): the resized uint8 pixels, one temporal copy, zlib; narrow token types.
It reports the stored bytes per record (torch.save of the stored example), the seconds to encode +
store a record and to read one back (what CachedExamples does per access), medians over records,
and checks every compact record reads back bit-equal to the baseline.

Usage: python bench/cache_storage.py [--records N] [--size WxH] [--max-pixels P] [--processor DIR]
The pixel budget is the demo router's (packaged router.yaml) unless --max-pixels (the 8B preset
uses 802816 with --size 1280x960). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def demo_pixel_budget() -> tuple[int, int]:
    """(min_pixels, max_pixels) of the packaged router.yaml: the budget the demo preprocesses with."""
    import yaml

    from mole_trainer.configs import default_text

    image = yaml.safe_load(default_text("router.yaml"))["image"]
    return image["min_pixels"], image["max_pixels"]


def stored_bytes(example: dict) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(example, buf)
    return buf.tell()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    import torch

    from mole_trainer.data.formats import load_expert_dataset
    from mole_trainer.data.pixels import COMPACT, PLAIN, PixelSpec, pack_example, same_example, unpack_example
    from mole_trainer.data.preprocess import encode_sample
    from mole_trainer.data.synth import SYNTH_EXPERTS, synthesize
    from mole_trainer.model.loading import load_processor
    from mole_trainer.model.tiny import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--size", default="448x336", help="synthetic screen WIDTHxHEIGHT")
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument(
        "--processor", default=None, help="a Qwen3-VL processor folder (default: the tiny model's)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in the preprocessing workers
    size = tuple(int(v) for v in args.size.split("x"))
    min_pixels, max_pixels = demo_pixel_budget()
    max_pixels = args.max_pixels or max_pixels
    root = Path(tempfile.mkdtemp(prefix="mole-bench-cache-"))
    try:
        model = args.processor or str(build_tiny_model(root / "model"))
        per_expert = -(-args.records // len(SYNTH_EXPERTS))
        synthesize(root / "data", SYNTH_EXPERTS, {"train": per_expert, "val": 0, "test": 0}, 0, size)
        samples = []
        for name in SYNTH_EXPERTS:
            for s in load_expert_dataset(root / "data" / name)["train"]:
                s.expert = name
                samples.append(s)
        samples = samples[: args.records]
        processor = load_processor(model, min_pixels, max_pixels)
        spec = PixelSpec.of(processor.image_processor)
        names = sorted(SYNTH_EXPERTS)
        rows = {PLAIN: [], COMPACT: []}
        equal = 0
        for s in samples:
            plain, plain_s = timed(
                lambda s=s: pack_example(encode_sample(processor, s, "router", names), spec, PLAIN)
            )
            compact, compact_s = timed(
                lambda s=s: pack_example(
                    encode_sample(processor, s, "router", names, raw_pixels=True), spec, COMPACT
                )
            )
            a, read_plain = timed(lambda plain=plain: unpack_example(plain, spec))
            b, read_compact = timed(lambda compact=compact: unpack_example(compact, spec))
            equal += same_example(a, b)
            rows[PLAIN].append((stored_bytes(plain), plain_s, read_plain))
            rows[COMPACT].append((stored_bytes(compact), compact_s, read_compact))
            grid = a["image_grid_thw"].tolist()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(kind: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[kind])

    result = {
        "records": len(samples),
        "image_size": list(size),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "grid_thw": grid[0],
        "processor": "tiny" if args.processor is None else Path(args.processor).name,
        "bit_equal": f"{equal}/{len(samples)}",
        "bytes_per_record_float32": int(med(PLAIN, 0)),
        "bytes_per_record_compact": int(med(COMPACT, 0)),
        "size_ratio": round(med(PLAIN, 0) / med(COMPACT, 0), 1),
        "encode_ms_float32": round(med(PLAIN, 1) * 1e3, 2),
        "encode_ms_compact": round(med(COMPACT, 1) * 1e3, 2),
        "read_ms_float32": round(med(PLAIN, 2) * 1e3, 3),
        "read_ms_compact": round(med(COMPACT, 2) * 1e3, 3),
    }
    print(
        f"{result['records']} records {size[0]}x{size[1]}, max_pixels {max_pixels}: "
        f"{result['bytes_per_record_float32']} -> {result['bytes_per_record_compact']} bytes per record "
        f"({result['size_ratio']}x smaller), bit-equal {result['bit_equal']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
