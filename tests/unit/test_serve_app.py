"""The app around a scripted engine (no model): engine failures become a 500 naming the error and the
server goes on; a stream whose engine reports no pieces still delivers the whole answer; metrics count."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("httpx2")  # starlette's TestClient (installed with openai, dev extra)

from starlette.testclient import TestClient  # noqa: E402

from mole_trainer.errors import UserError  # noqa: E402
from mole_trainer.infer.engine import Result  # noqa: E402
from mole_trainer.serve.app import ServedStack, build_app  # noqa: E402
from mole_trainer.serve.messages import Limits, parse_chat_request  # noqa: E402

BODY = {"model": "mole", "messages": [{"role": "user", "content": "Read the text."}], "max_tokens": 3}


class ScriptedStack(ServedStack):
    """Answers "echo: <text>" from expert "ocr"; a request whose text contains "boom" fails its batch
    (a RuntimeError), "odd" a UserError; the check refuses "<|im_end|>" as the engine's does."""

    def __init__(self, stream: bool = True):
        super().__init__(engine=None, experts=["calendar", "ocr"], base_model="tiny")
        self.stream, self.batches = stream, []

    def request(self, chat, on_text=None):
        return (chat, on_text)

    def check(self, chat):
        if "<|im_end|>" in chat.sample.instruction:
            raise UserError(f"{chat.id}: the text contains the special token '<|im_end|>'")

    def run(self, requests):
        self.batches.append(len(requests))
        if any("boom" in chat.sample.instruction for chat, _ in requests):
            raise RuntimeError("CUDA out of memory")
        if any("odd" in chat.sample.instruction for chat, _ in requests):
            raise UserError("chatcmpl-x: image 1 (300x1) cannot be processed")
        out = []
        for chat, on_text in requests:
            text = f"echo: {chat.sample.instruction}"
            if on_text is not None and self.stream:
                for piece in (text[:5], text[5:]):
                    on_text(piece)
            out.append(
                Result(
                    id=chat.id,
                    expert="ocr",
                    probability=0.75,
                    top_k=[("ocr", 0.75), ("calendar", 0.25)],
                    probs={"calendar": 0.25, "ocr": 0.75},
                    forced=False,
                    fallback=None,
                    output=text,
                    prompt_tokens=11,
                    completion_tokens=3,
                    finish_reason="length",
                    timings={"route_s": 0.01, "generate_s": 0.02, "batch_size": len(requests)},
                )
            )
        return out


def _events(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_an_engine_failure_is_a_500_naming_it_and_the_next_request_is_served():
    with TestClient(build_app(ScriptedStack())) as client:
        bad = client.post(
            "/v1/chat/completions", json={**BODY, "messages": [{"role": "user", "content": "boom"}]}
        )
        assert bad.status_code == 500
        assert bad.json()["error"]["message"] == "the engine failed: RuntimeError: CUDA out of memory"
        assert bad.json()["error"]["type"] == "server_error" and "Traceback" not in bad.text
        good = client.post("/v1/chat/completions", json=BODY).json()
        assert good["choices"][0]["message"]["content"] == "echo: Read the text."
        assert good["mole"]["top_k"] == [["ocr", 0.75], ["calendar", 0.25]]
        assert good["mole"]["timings"]["route"] == 0.01 and good["mole"]["timings"]["generate"] == 0.02
        assert good["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        metrics = client.get("/metrics").text
        assert 'mole_requests_total{expert="ocr",model="mole",status="200"} 1.0' in metrics
        assert 'mole_requests_total{expert="",model="mole",status="500"} 1.0' in metrics
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("engine_streams", [True, False])
def test_a_stream_delivers_every_piece_then_the_rest_of_the_answer(engine_streams):
    with TestClient(build_app(ScriptedStack(stream=engine_streams))) as client:
        resp = client.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert pieces == (["echo:", " Read the text."] if engine_streams else ["echo: Read the text."])
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["mole"]["expert"] == "ocr"


def test_unknown_paths_and_methods_answer_in_openai_error_shape():
    with TestClient(build_app(ScriptedStack())) as client:
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert client.get("/v1/chat/completions").status_code == 405


def _say(text: str) -> dict:
    return {**BODY, "messages": [{"role": "user", "content": text}]}


def test_one_bad_request_fails_alone_and_the_rest_of_its_batch_is_answered():
    stack = ScriptedStack()
    texts = ["first", "boom", "odd", "last"]
    with TestClient(build_app(stack, max_batch=4, max_wait_ms=2000)) as client:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: client.post("/v1/chat/completions", json=_say(t)), texts))
        assert [a.status_code for a in answers] == [200, 500, 400, 200]
        assert answers[0].json()["choices"][0]["message"]["content"] == "echo: first"
        assert answers[2].json()["error"]["message"] == "chatcmpl-x: image 1 (300x1) cannot be processed"
        assert client.get("/health").json()["status"] == "ok"
    assert stack.batches == [4, 1, 1, 1, 1]  # the failed batch, then each of its requests alone


def test_a_request_the_engine_check_refuses_is_a_400_before_it_is_queued():
    stack = ScriptedStack()
    with TestClient(build_app(stack)) as client:
        for stream in (False, True):
            bad = client.post("/v1/chat/completions", json={**_say("hi<|im_end|>"), "stream": stream})
            assert bad.status_code == 400, bad.text
            assert "special token '<|im_end|>'" in bad.json()["error"]["message"]
    assert stack.batches == []


class FlakyEngine:
    """Streams "Hel", "lo" for every request, then fails any batch of more than one."""

    def check(self, request):
        pass

    def run(self, requests, batch_size):
        for r in requests:
            r.on_text("Hel")
            r.on_text("lo")
        if len(requests) > 1:
            raise RuntimeError("batch failed")
        return ["answer"]


def test_a_stream_answered_again_alone_sends_its_text_once():
    stack = ServedStack(FlakyEngine(), ["ocr"], "tiny")
    sent: list[list[str]] = [[], []]
    chats = [parse_chat_request(_say(t), ["ocr"], Limits()) for t in ("a", "b")]
    reqs = [stack.request(c, sent[i].append) for i, c in enumerate(chats)]
    with pytest.raises(RuntimeError):
        stack.run(reqs)
    assert stack.run([reqs[0]]) == ["answer"]
    assert sent == [["Hel", "lo"], ["Hel", "lo"]]
