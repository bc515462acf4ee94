"""The FastAPI app: OpenAI's chat completions over the routed stack, plus models, health and metrics.

    POST /v1/chat/completions   routed ("model": "mole") or forced ("model": "<expert>"); stream: true for SSE
    GET  /v1/models             "mole" and every expert, the base model as their parent
    GET  /health                200 while the engine worker runs, 503 once it stopped or is draining
    GET  /metrics               Prometheus text

Handlers parse and validate a request (image decoding runs in a thread, off the event loop), put it
on the micro-batcher and await its result; only the batcher's worker touches the engine. Every
refusal is a 4xx JSON error in OpenAI's shape; an engine failure is a 500 naming the error, never a
traceback, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

# this module is imported only to serve: FastAPI resolves the handlers' annotations from its globals
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .batcher import MicroBatcher
from .defaults import MAX_BATCH, MAX_WAIT_MS
from .errors import ApiError
from .messages import ROUTED_MODEL, ChatRequest, Limits, parse_chat_request, parse_json_body
from .metrics import Metrics

OWNER = "mole-trainer"


class ServedStack:
    """What the app serves: the engine's `run(requests, batch_size)`, its experts and base model name."""

    def __init__(self, engine, experts: list[str], base_model: str):
        self.engine, self.experts, self.base_model = engine, list(experts), base_model

    def run(self, requests: list) -> list:
        """Answer a batch of engine Requests (called on the batcher's worker thread only)."""
        for r in requests:  # a request answered again (its batch failed) streams only what is new
            if isinstance(r.on_text, StreamOnce):
                r.on_text.restart()
        return self.engine.run(requests, batch_size=len(requests))

    def check(self, chat: ChatRequest) -> None:
        """Raise UserError when the engine cannot answer the request as asked (no model work: safe
        off the worker thread)."""
        self.engine.check(self.request(chat))

    def request(self, chat: ChatRequest, on_text: Callable[[str], None] | None = None):
        """The engine Request of a chat-completion request."""
        from ..infer.engine import Request

        return Request(
            sample=chat.sample,
            expert=chat.expert,
            max_new_tokens=chat.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            on_text=None if on_text is None else StreamOnce(on_text),
        )


class StreamOnce:
    """A streaming callback that passes on only text not sent yet: a request answered twice (its
    batch failed, then it ran alone) streams its answer once. An answer that departs from what was
    already sent (a sampled one) streams nothing more; the final chunk carries the rest."""

    def __init__(self, send: Callable[[str], None]):
        self.send, self.sent, self.text = send, "", ""

    def restart(self) -> None:
        """A new attempt at the answer begins."""
        self.text = ""

    def __call__(self, piece: str) -> None:
        self.text += piece
        if len(self.text) > len(self.sent) and self.text.startswith(self.sent):
            new, self.sent = self.text[len(self.sent) :], self.text
            self.send(new)


def mole_info(result, timings: dict[str, float]) -> dict:
    """The `mole` object of a response: who answered, how sure the router was, where the time went."""
    return {
        "expert": result.expert,
        "probability": result.probability,
        "top_k": [list(t) for t in result.top_k],
        "forced": result.forced,
        "fallback": result.fallback,
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def completion_body(chat: ChatRequest, result, timings: dict[str, float], created: int) -> dict:
    """A standard chat.completion object plus the `mole` object."""
    return {
        "id": chat.id,
        "object": "chat.completion",
        "created": created,
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.output},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "mole": mole_info(result, timings),
    }


def chunk(chat: ChatRequest, created: int, delta: dict, finish_reason: str | None = None, **extra) -> str:
    """One server-sent event holding a chat.completion.chunk."""
    body = {
        "id": chat.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": chat.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def build_app(
    stack: ServedStack,
    limits: Limits | None = None,
    max_batch: int = MAX_BATCH,
    max_wait_ms: float = MAX_WAIT_MS,
):
    """The FastAPI app serving `stack`; the batcher's worker starts with the app and drains when it stops."""
    limits = limits or Limits()
    metrics = Metrics()
    state: dict[str, Any] = {"batcher": None}
    created = int(time.time())

    def new_batcher() -> MicroBatcher:
        return MicroBatcher(
            stack.run,
            max_batch,
            max_wait_ms / 1000,
            on_batch=metrics.batch_size.observe,
            on_depth=metrics.queue_depth.set,
        )

    @asynccontextmanager
    async def lifespan(_app):
        state["batcher"] = new_batcher()
        yield
        # uvicorn has waited for in-flight requests; answer whatever is still queued, then stop
        await run_in_threadpool(state["batcher"].close)

    app = FastAPI(title="mole serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    def batcher() -> MicroBatcher:
        b = state["batcher"]
        if b is None:  # an app used without its lifespan (some test clients): start the worker now
            b = state["batcher"] = new_batcher()
        if not b.alive:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        return b

    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        b = state["batcher"]
        ok = b is None or b.alive
        body = {
            "status": "ok" if ok else "stopping",
            "experts": stack.experts,
            "queue_depth": b.depth() if b else 0,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return _models_body(stack, created)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        start = time.perf_counter()
        model = "?"
        try:
            obj = parse_json_body(await read_body(request, limits.max_body_bytes))
            model = obj.get("model") if isinstance(obj.get("model"), str) else "?"
            chat = await run_in_threadpool(parse_chat_request, obj, stack.experts, limits)
            await run_in_threadpool(checked, stack, chat)
            b = batcher()
        except ApiError as exc:
            metrics.requests.labels(_model_label(model, stack), "", str(exc.status)).inc()
            raise
        if chat.stream:
            return StreamingResponse(
                stream_events(chat, b, stack, metrics, start), media_type="text/event-stream"
            )
        metrics.in_flight.inc()
        try:
            job = submit(b, stack.request(chat))
            try:
                result = await asyncio.wrap_future(job.future)
            except Exception as exc:
                err = engine_error(exc)
                metrics.requests.labels(chat.model, chat.expert or "", str(err.status)).inc()
                raise err from None
        finally:
            metrics.in_flight.dec()
        timings = request_timings(job, result, start)
        record(metrics, chat, result, timings)
        return completion_body(chat, result, timings, int(time.time()))

    return app


def _add_error_handlers(app) -> None:
    """Every error leaves as an OpenAI-style error body: ours, FastAPI's own, and unexpected ones (500)."""

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
        return JSONResponse(err.body(), status_code=500)


def _models_body(stack: ServedStack, created: int) -> dict:
    """GET /v1/models: the routed model and every expert, each on the stack's base model."""
    names = [ROUTED_MODEL, *stack.experts]
    data = [
        {
            "id": n,
            "object": "model",
            "created": created,
            "owned_by": OWNER,
            "root": stack.base_model,
            "parent": stack.base_model,
        }
        for n in names
    ]
    return {"object": "list", "data": data}


def _model_label(model: str, stack: ServedStack) -> str:
    """The model label of a refused request: a served name, or 'other' (no label per unknown name)."""
    return model if model == ROUTED_MODEL or model in stack.experts else "other"


def checked(stack: ServedStack, chat: ChatRequest) -> None:
    """The engine's own checks of a request (special tokens in its text, ...) as a 400."""
    from ..errors import UserError

    try:
        stack.check(chat)
    except UserError as exc:
        raise ApiError(400, str(exc), "messages", "invalid_request") from None


def submit(b: MicroBatcher, request):
    try:
        return b.submit(request)
    except RuntimeError as exc:  # closed between the check and the submit
        raise ApiError(503, str(exc), None, "shutting_down") from None


def engine_error(exc: BaseException) -> ApiError:
    """The API error of an engine failure: a user mistake the engine found is a 400, anything else a 500."""
    from ..errors import UserError

    if isinstance(exc, UserError):
        return ApiError(400, str(exc), None, "invalid_request")
    return ApiError(500, f"the engine failed: {type(exc).__name__}: {exc}", None, "engine_error")


def request_timings(job, result, start: float) -> dict[str, float]:
    """Seconds in the queue, routing, generating (the engine's, for the request's batch) and in total."""
    engine = result.timings or {}
    out = {"queue": (job.started_at or start) - job.queued_at}
    for stage in ("route", "generate"):
        if f"{stage}_s" in engine:
            out[stage] = float(engine[f"{stage}_s"])
    out["total"] = time.perf_counter() - start
    return out


def record(metrics: Metrics, chat: ChatRequest, result, timings: dict[str, float], status: int = 200) -> None:
    metrics.requests.labels(chat.model, result.expert or "base", str(status)).inc()
    metrics.observe_latency(timings)
    metrics.tokens.labels("prompt").inc(result.prompt_tokens)
    metrics.tokens.labels("completion").inc(result.completion_tokens)
    if result.fallback:
        metrics.fallbacks.inc()


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"request body of {declared} bytes is over the limit of {limit} bytes",
            None,
            "body_too_large",
        )
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", None, "body_too_large")
        chunks.append(part)
    return b"".join(chunks)


async def stream_events(
    chat: ChatRequest, b: MicroBatcher, stack: ServedStack, metrics: Metrics, start: float
):
    """Server-sent events of a streamed completion: a role chunk, a chunk per piece of text as the
    engine makes it, a final chunk with the finish reason and the `mole` object, usage if asked, [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(text: str) -> None:  # on the worker thread
        # the event loop may be gone (client left at shutdown): generation goes on regardless
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(pieces.put_nowait, text)

    created = int(time.time())
    metrics.in_flight.inc()
    try:
        try:
            job = submit(b, stack.request(chat, on_text))
        except ApiError as exc:
            metrics.requests.labels(chat.model, chat.expert or "", str(exc.status)).inc()
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        job.future.add_done_callback(lambda _f: _notify(loop, pieces))
        yield chunk(chat, created, {"role": "assistant", "content": ""})
        sent = ""
        while True:
            piece = await pieces.get()
            if piece is None:
                break
            if piece:
                sent += piece
                yield chunk(chat, created, {"content": piece})
        try:
            result = job.future.result()
        except Exception as exc:
            err = engine_error(exc)
            metrics.requests.labels(chat.model, chat.expert or "", str(err.status)).inc()
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        if result.output != sent and result.output.startswith(sent):  # an engine that streamed less
            yield chunk(chat, created, {"content": result.output[len(sent) :]})
        timings = request_timings(job, result, start)
        record(metrics, chat, result, timings)
        yield chunk(chat, created, {}, result.finish_reason, mole=mole_info(result, timings))
        if chat.include_usage:
            body = {
                "id": chat.id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [],
                "usage": usage(result),
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        metrics.in_flight.dec()


def _notify(loop, pieces) -> None:
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(pieces.put_nowait, None)
