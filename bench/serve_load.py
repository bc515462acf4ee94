"""Benchmark: closed-loop load on a live `mole serve` against a serial one-request-at-a-time engine loop.

Same deployment, same requests, one machine. The serial baseline runs in this process (half its
requests before the load, half after, so a shared machine's drift hits both sides): the engine
answers one request at a time (`Engine.run([request], batch_size=1)`, no HTTP), the best a server
without batching could do. Then `mole serve` starts as a subprocess on 127.0.0.1 (a free port) and
C client threads each send a request, wait for its answer and send the next (closed loop), for C
in --clients. Per level: requests/s, p50/p95 latency (client side), the router's share of the
latency (route seconds / total seconds, as the server reports them per request) and the mean batch
size (from /metrics). `batched_over_serial` is requests/s at the largest C over the serial loop's.

Usage: PYTHONPATH=src python bench/serve_load.py [--clients 1,4,16] [--requests 8] [--max-tokens 8]
       [--deployment DIR --device cuda]   (default: the tiny model with random adapters, on the CPU)
       [--shape 2b|8b [--layers N] [--rank 16] [--image 448x280]]   (a real shape, random weights)
The tiny model is built around the real Qwen3-VL-8B processor of tests/fixtures (151,936-token
vocabulary: the LM head and prompt lengths are real), as in bench/stacked_inference.py. `--shape`
builds the base as stacked_inference.py does (random weights at Qwen3-VL-2B / -8B shapes, bf16 on
CUDA; `--layers` cuts it for a smoke run), saves it with the processor (the server loads it from
disk; an 8B one is 16 GB) and deploys stacked_inference's 4 random experts + router on it; the
serial loop reuses the model already built.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # stacked_inference (the real-shape models)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROCESSOR = REPO / "tests/fixtures/qwen3-vl-8b-processor"  # the real Qwen3-VL-8B processor (no weights)
PROMPTS = ["Click on the 14th.", "What is the total in March?", "Log in as admin.", "Read the text."]


def tiny_deployment(root: Path, processor: str) -> str:
    """The tests' deployment (a router and 4 experts of random LoRA weights) on the tiny Qwen3-VL, built
    around `processor` (a processor folder: its tokenizer, vocabulary and chat template) if given."""
    from tests.helpers import build_tiny_deployment

    from mole_trainer.model.tiny import build_tiny_model

    model = build_tiny_model(root / "tiny", processor_dir=processor or None)
    return build_tiny_deployment(model, root)["deployment"]


def shaped_deployment(root: Path, shape: str, device: str, dtype: str, layers: int | None, rank: int, size):
    """(deployment, model): a random-weight Qwen3-VL at a real shape (stacked_inference.shaped_model),
    saved with the real processor in root/base, and stacked_inference's random deployment on it."""
    from mole_trainer.model.tiny import generation_config, load_given_processor
    from stacked_inference import random_deployment, shaped_model

    model = shaped_model(shape, device, dtype, layers)
    processor = load_given_processor(PROCESSOR)
    model.generation_config = generation_config(processor.tokenizer)
    folder = root / "base"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return random_deployment(folder, root, model, rank, size, 8)["deployment"], model


def make_images(n: int, size: tuple[int, int] = (160, 120)) -> list[bytes]:
    """n distinct PNG screens of `size` (colour blocks and a bar of varying width)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        im = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256))
        ImageDraw.Draw(im).rectangle([10, 10, 20 + 7 * (i % 16), 40], fill=(255 - (37 * i) % 256, 20, 200))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class SerialLoop:
    """The engine answering one request at a time, in this process (no HTTP, no batching)."""

    def __init__(self, deployment: str, images: list[bytes], device: str, max_tokens: int, model=None):
        from mole_trainer.infer.engine import Engine

        self.engine = Engine(deployment, device=device, model=model)
        self.images, self.max_tokens = images, max_tokens
        self.times: list[float] = []
        self.engine.run([self.request(0)], batch_size=1)  # warm-up

    def request(self, i: int):
        from PIL import Image

        from mole_trainer.data.records import Sample
        from mole_trainer.infer.engine import Request

        im = Image.open(io.BytesIO(self.images[i % len(self.images)])).convert("RGB")
        prompt = PROMPTS[i % len(PROMPTS)]
        sample = Sample(id=f"r{i}", images=[im], instruction=prompt, answer="", source=f"r{i}")
        return Request(sample, max_new_tokens=self.max_tokens)

    def run(self, n: int) -> None:
        """Answer n more requests one by one, timing each."""
        for _ in range(n):
            req = self.request(len(self.times))
            start = time.perf_counter()
            self.engine.run([req], batch_size=1)
            self.times.append(time.perf_counter() - start)

    def summary(self) -> dict:
        t = self.times
        return {
            "requests": len(t),
            "requests_per_s": round(len(t) / sum(t), 3),
            "p50_s": round(statistics.median(t), 4),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _batches(url: str) -> tuple[float, float]:
    """(batches, requests in them) so far, from /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("mole_batch_size_"))
    return float(values["mole_batch_size_count"]), float(values["mole_batch_size_sum"])


def load_level(url: str, bodies: list[dict], clients: int, n: int) -> dict:
    """Closed loop: `clients` threads share n requests, each sending its next one when answered."""
    lock = threading.Lock()
    todo = list(range(n))
    rows: list[tuple[float, dict]] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            start = time.perf_counter()
            resp = _post(f"{url}/v1/chat/completions", bodies[i % len(bodies)])
            with lock:
                rows.append((time.perf_counter() - start, resp["mole"]["timings"]))

    b0 = _batches(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    b1 = _batches(url)
    lat = sorted(r[0] for r in rows)
    route_share = sum(r[1].get("route", 0.0) for r in rows) / sum(r[1]["total"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "requests_per_s": round(len(rows) / wall, 3),
        "p50_s": round(statistics.median(lat), 4),
        "p95_s": round(lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], 4),
        "router_share": round(route_share, 4),
        "mean_batch": round((b1[1] - b0[1]) / max(1.0, b1[0] - b0[0]), 2),
    }


def start_server(
    deployment: str, device: str, max_batch: int, max_wait_ms: float, workdir: str, dtype="auto"
):
    port = _free_port()
    args = [
        sys.executable, "-m", "mole_trainer", "--workdir", workdir, "serve", "--deployment", deployment,
        "--port", str(port), "--device", device, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--dtype", dtype,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log = open(Path(workdir) / "server.log", "w")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(Path(workdir) / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url, log
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start in 600 s") from None
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployment", default=None, help="a deployment (default: the tiny random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--processor",
        default=str(PROCESSOR),
        help="processor folder the tiny model is built around ('' for the tiny local tokenizer)",
    )
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 per client)")
    ap.add_argument("--serial-requests", type=int, default=8, help="requests of the serial baseline")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--shape", choices=("tiny", "2b", "8b"), default="tiny", help="2b/8b: random weights")
    ap.add_argument("--layers", type=int, default=None, help="cut a 2b/8b shape to N layers (smoke runs)")
    ap.add_argument("--dtype", default="auto", help="of a --shape model: auto is bf16 on CUDA, else fp32")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of a --shape deployment")
    ap.add_argument("--image", default="160x120", help="request screen size WxH")
    a = ap.parse_args()
    levels = [int(c) for c in a.clients.split(",") if c]
    size = tuple(int(x) for x in a.image.lower().split("x"))
    if a.deployment and a.shape != "tiny":
        raise SystemExit("--deployment and --shape: give one")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model = None
        if a.shape != "tiny":
            deployment, model = shaped_deployment(
                Path(tmp), a.shape, a.device, a.dtype, a.layers, a.rank, size
            )
        else:
            deployment = a.deployment or tiny_deployment(Path(tmp), a.processor)
        images = make_images(16, size)
        # half the serial loop before the load and half after: a shared machine's drift hits both sides
        serial_loop = SerialLoop(deployment, images, a.device, a.max_tokens, model)
        serial_loop.run(a.serial_requests // 2)
        serial = serial_loop.summary()
        print(
            f"serial engine loop: {serial['requests_per_s']} requests/s (p50 {serial['p50_s']} s)", flush=True
        )
        bodies = [
            {
                "model": "mole",
                "max_tokens": a.max_tokens,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(im).decode()}},
                            {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                        ],
                    }
                ],
            }
            for i, im in enumerate(images)
        ]  # fmt: skip
        proc, url, log = start_server(deployment, a.device, a.max_batch, a.max_wait_ms, tmp, a.dtype)
        try:
            _post(f"{url}/v1/chat/completions", bodies[0])  # warm-up
            rows = []
            for c in levels:
                rows.append(load_level(url, bodies, c, max(a.requests, 2 * c)))
                r = rows[-1]
                print(
                    f"{c:>3} clients: {r['requests_per_s']:>7} req/s  p50 {r['p50_s']:>7} s  p95 {r['p95_s']:>7} s  "
                    f"router {r['router_share']:.0%}  mean batch {r['mean_batch']}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            log.close()
        serial_loop.run(a.serial_requests - a.serial_requests // 2)
        serial = serial_loop.summary()
        print(f"serial engine loop (before + after): {serial['requests_per_s']} requests/s", flush=True)
    top = rows[-1]
    print(
        json.dumps(
            {
                "bench": "serve_load",
                "device": a.device,
                "deployment": a.deployment
                or (
                    f"{a.shape} (random weights{'' if a.layers is None else f', {a.layers} layers'})"
                    if a.shape != "tiny"
                    else f"tiny (random adapters), processor {a.processor or 'local'}"
                ),
                "image": a.image,
                "max_tokens": a.max_tokens,
                "max_batch": a.max_batch,
                "max_wait_ms": a.max_wait_ms,
                "serial": serial,
                "levels": rows,
                "batched_over_serial": round(top["requests_per_s"] / serial["requests_per_s"], 3),
                "at_clients": top["clients"],
            }
        )
    )


if __name__ == "__main__":
    main()
