"""`mole serve` as a user runs it: a real server subprocess on 127.0.0.1, spoken to with the official
`openai` client (and raw HTTP for requests the client cannot send), compared with `mole infer`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
LIMITS = {"max_image_pixels": 40_000, "max_images": 2, "max_body_bytes": 200_000, "max_tokens": 16}
PROMPTS = ["Click on the 14th.", "What is the total in March?", "Log in as admin.", "Read the text."]
COLORS = [(220, 30, 30), (30, 200, 40), (20, 40, 210), (230, 230, 20), (240, 240, 240), (10, 10, 10),
          (120, 60, 180), (20, 160, 160)]  # fmt: skip
STARTUP_S = 120


class Reply:
    """Status and body of a raw HTTP exchange (urllib: the test needs no HTTP client of its own)."""

    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def http(url: str, data: bytes | dict | None = None, timeout: float = 120) -> Reply:
    """GET `url`, or POST `data` (bytes as they are, a dict as JSON) to it."""
    import urllib.error
    import urllib.request

    if isinstance(data, dict):
        data = json.dumps(data).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read().decode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(path: Path, color, size=(96, 72)) -> Path:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, color)
    ImageDraw.Draw(im).rectangle([8, 8, 40, 30], fill=tuple(255 - c for c in color))
    im.save(path)
    return path


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def requests_dir(tmp_path_factory):
    """32 requests (8 images x 4 prompts) as image files and a `mole infer` JSONL; a folder for --allow-files."""
    root = tmp_path_factory.mktemp("serve")
    (root / "images").mkdir()
    images = [_png(root / "images" / f"im{i}.png", c) for i, c in enumerate(COLORS)]
    reqs = [
        {"id": f"r{i * len(PROMPTS) + j}", "image": f"images/{im.name}", "prompt": p}
        for i, im in enumerate(images)
        for j, p in enumerate(PROMPTS)
    ]
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    allowed = root / "allowed"
    allowed.mkdir()
    _png(allowed / "screen.png", (90, 90, 200))
    return root


@pytest.fixture(scope="module")
def threshold(tiny_deployment, requests_dir):
    """A --min-probability between the requests' routing probabilities: some are answered by the fallback."""
    from mole_trainer.infer.engine import Engine
    from mole_trainer.infer.stacked import requests_from_jsonl

    engine = Engine(tiny_deployment["deployment"], device="cpu")
    probs = engine.route(requests_from_jsonl(requests_dir / "requests.jsonl")).max(-1).values.tolist()
    del engine
    return round(sorted(probs)[len(probs) // 2], 4)


@pytest.fixture(scope="module")
def server(tiny_deployment, requests_dir, threshold, tmp_path_factory):
    """(base URL, process) of `mole serve` on a free port; stopped at the end of the module."""
    port = _free_port()
    args = [
        sys.executable, "-m", "mole_trainer", "--workdir", str(tmp_path_factory.mktemp("serve-wd")), "serve",
        "--deployment", tiny_deployment["deployment"], "--port", str(port), "--device", "cpu",
        "--max-batch", "8", "--max-wait-ms", "150", "--allow-files", str(requests_dir / "allowed"),
        "--min-probability", str(threshold), "--fallback", "base",
        *(x for k, v in LIMITS.items() for x in (f"--{k.replace('_', '-')}", str(v))),
    ]  # fmt: skip
    log = (requests_dir / "server.log").open("w")
    proc = subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert proc.poll() is None, (requests_dir / "server.log").read_text()
        try:
            if http(f"{url}/health", timeout=1).status_code == 200:
                break
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def infer_results(tiny_deployment, requests_dir, threshold, tmp_path_factory):
    """{id: result} of `mole infer`'s stage function on the 32 requests, with the server's fallback settings
    (in-process: the CLI is thin over it, and a second interpreter would only add start-up time)."""
    from mole_trainer import stages
    from mole_trainer.infer.stacked import requests_from_jsonl

    results = stages.infer(
        tiny_deployment["deployment"],
        requests_from_jsonl(requests_dir / "requests.jsonl"),
        tmp_path_factory.mktemp("infer-wd"),
        max_new_tokens=MAX_TOKENS,
        device="cpu",
        min_probability=threshold,
        fallback="base",
    )
    return {r["id"]: r for r in results}


def _user(image_url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_models_lists_mole_and_every_expert_with_the_base_as_parent(client, tiny_deployment):
    models = client.models.list().data
    assert [m.id for m in models] == ["mole", *tiny_deployment["names"]]
    parents = {m.model_extra["parent"] for m in models}
    assert len(parents) == 1 and Path(parents.pop()).name == "tiny"


def test_routed_request_with_a_base64_image(client, requests_dir, tiny_deployment):
    image = _data_url(requests_dir / "images" / "im0.png")
    resp = client.chat.completions.create(
        model="mole", messages=_user(image, PROMPTS[0]), max_tokens=MAX_TOKENS
    )
    mole = resp.model_extra["mole"]
    assert resp.object == "chat.completion" and resp.model == "mole" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant" and isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS and resp.usage.prompt_tokens > 0
    assert not mole["forced"] and 0 < mole["probability"] <= 1
    assert mole["top_k"][0][1] == mole["probability"] and mole["top_k"][0][0] in tiny_deployment["names"]
    assert mole["expert"] == (mole["fallback"] or mole["top_k"][0][0])
    assert set(mole["timings"]) == {"queue", "route", "generate", "total"} and mole["timings"]["route"] > 0


def test_forced_expert_request_with_an_allowed_local_file(client):
    resp = client.chat.completions.create(
        model="ocr", messages=_user("screen.png", "Read the text."), max_tokens=MAX_TOKENS, temperature=0
    )
    mole = resp.model_extra["mole"]
    assert resp.model == "ocr" and mole["expert"] == "ocr" and mole["forced"] and mole["probability"] is None
    assert mole["top_k"] == [] and mole["fallback"] is None


def test_streamed_request_adds_up_to_the_whole_answer(client, requests_dir):
    messages = _user(_data_url(requests_dir / "images" / "im1.png"), PROMPTS[1])
    whole = client.chat.completions.create(model="calendar", messages=messages, max_tokens=MAX_TOKENS)
    chunks = list(
        client.chat.completions.create(
            model="calendar",
            messages=messages,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # token by token, not one block at the end
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["mole"]["expert"] == "calendar"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_32_concurrent_requests_answer_as_mole_infer_and_share_batches(
    client, server, requests_dir, infer_results
):
    reqs = [json.loads(line) for line in (requests_dir / "requests.jsonl").read_text().splitlines()]

    def ask(r):
        messages = _user(_data_url(requests_dir / r["image"]), r["prompt"])
        return client.chat.completions.create(model="mole", messages=messages, max_tokens=MAX_TOKENS)

    before = _batches(server[0])
    with ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(ask, reqs))
    fallbacks = 0
    for r, resp in zip(reqs, answers, strict=True):
        want, mole = infer_results[r["id"]], resp.model_extra["mole"]
        assert (mole["expert"], resp.choices[0].message.content) == (want["expert"], want["output"]), r["id"]
        assert mole["probability"] == pytest.approx(want["probability"], abs=1e-4)
        assert mole["fallback"] == want["fallback"]
        fallbacks += mole["fallback"] == "base"
    assert 0 < fallbacks < len(reqs)  # the threshold splits the requests: both paths were served
    count, singles = (a - b for a, b in zip(_batches(server[0]), before, strict=True))
    assert count - singles >= 1 and count < len(reqs)  # batches of more than one request


def _batches(url: str) -> tuple[float, float]:
    """(batches so far, batches of one request) from /metrics."""
    text = http(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith(("mole_batch_size_count", 'mole_batch_size_bucket{le="1.0"}')):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values["mole_batch_size_count"], values['mole_batch_size_bucket{le="1.0"}']


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, requests_dir):
    url = f"{server[0]}/v1/chat/completions"
    good_image = _data_url(requests_dir / "images" / "im2.png")

    def body(**kw):
        return {"model": "mole", "messages": _user(good_image, "Click."), "max_tokens": 2, **kw}

    from PIL import Image

    big = requests_dir / "big.png"
    Image.new("RGB", (250, 200), (1, 2, 3)).save(big)  # 50 000 pixels > --max-image-pixels 40 000
    cases = {
        "malformed JSON": (b'{"model": "mole", "messages": [', 400, "not valid JSON"),
        "missing messages": ({"model": "mole"}, 400, "'messages' is required"),
        "bad base64": (body(messages=_user("data:image/png;base64,%%%", "x")), 400, "not valid base64"),
        "not an image": (
            body(messages=_user("data:image/png;base64," + base64.b64encode(b"hello").decode(), "x")),
            400,
            "not an image",
        ),
        "image too large": (body(messages=_user(_data_url(big), "x")), 400, "250x200 = 50000 pixels"),
        "too many images": (
            body(messages=[{"role": "user", "content": _user(good_image, "x")[0]["content"] * 3}]),
            400,
            "at most 2",
        ),
        "unknown model": (body(model="gpt-4o"), 404, "model 'gpt-4o' does not exist"),
        "max_tokens out of range": (body(max_tokens=17), 400, "from 1 to 16"),
        "body too large": (body(padding="x" * 250_000), 413, "over the limit of 200000 bytes"),
        "file outside --allow-files": (
            body(messages=_user(str(big), "x")),
            403,
            "outside the allowed folder",
        ),
        "no --allow-files escape": (
            body(messages=_user("../big.png", "x")),
            403,
            "outside the allowed folder",
        ),
        "remote URL": (body(messages=_user("http://example.com/a.png", "x")), 400, "not fetched"),
        "wrong role order": (
            {"model": "mole", "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "last message must be the user",
        ),
    }
    for name, (payload, status, words) in cases.items():
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        resp = http(url, data, timeout=30)
        assert resp.status_code == status, (name, resp.text)
        error = resp.json()["error"]
        assert words in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in resp.text
    assert http(f"{server[0]}/health").json()["status"] == "ok"
    metrics = http(f"{server[0]}/metrics").text
    refused = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mole_requests_total{") and 'status="4' in line
    )
    assert refused >= len(cases)
    ok = http(url, body())  # and it still answers
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_sigterm_lets_the_request_in_flight_finish(server, requests_dir):
    """Last in this module: it stops the server."""
    url, proc = server
    result = {}

    def ask():
        body = {"model": "mole", "messages": _user(_data_url(requests_dir / "images" / "im3.png"), "Hi")}
        result["resp"] = http(f"{url}/v1/chat/completions", {**body, "max_tokens": 6})

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while "mole_requests_in_flight 1.0" not in http(f"{url}/metrics").text:
        assert time.monotonic() < deadline and t.is_alive(), "the request never showed as in flight"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert result["resp"].status_code == 200, result["resp"].text
    assert result["resp"].json()["usage"]["completion_tokens"] > 0
    assert proc.wait(timeout=60) == 0
