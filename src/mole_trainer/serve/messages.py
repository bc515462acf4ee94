"""OpenAI chat-completion requests: validated and turned into the Sample the engine answers.

A request is the body of `POST /v1/chat/completions`::

    {"model": "mole" | "<expert>", "messages": [...], "max_tokens": 32, "temperature": 0,
     "top_p": 1, "seed": 0, "stream": false, "stream_options": {"include_usage": true}}

Messages are an optional system (or developer) prompt, then user and assistant turns in
alternation, ending with the user turn to answer. User content is a string or a list of
`{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url"}}` parts; an image URL is
a `data:` URL with base64 bytes, or (only when the server was given `--allow-files DIR`) a local
path or `file://` URL inside DIR. Remote URLs are not fetched. The Python API (`MoLE.chat`, the
caller's own process) parses with `Limits(caller_images=True)`: the URL may also be a PIL image, a
`pathlib.Path`, or a local path anywhere (relative to the working directory). Images are decoded here, once, into
RGB PIL images held by the Sample; the engine shares them between router and expert.

Every problem is an ApiError (4xx) naming the field, e.g. `messages[1].content[0].image_url.url`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..data.conversation import MESSAGE_ROLES, RawTurn, check_conversation, router_request
from ..data.records import Sample
from ..errors import UserError
from ..infer.limits import TEMPERATURE_RANGE, check_image_size, check_seed
from .defaults import MAX_BODY_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_TOKENS
from .errors import ApiError

ROUTED_MODEL = "mole"  # the model name that routes; an expert's name forces that expert (the one source)

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system prompt
# fields a request may carry without changing anything here: OpenAI bookkeeping
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# fields accepted only at the value that means "off" (anything else is refused, not silently ignored)
OFF_VALUES: dict[str, tuple] = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
KNOWN_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stream_options",
    *IGNORED_FIELDS,
    *OFF_VALUES,
)
DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class Limits:
    """What one request may hold (the server's options)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = MAX_IMAGES
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens: int = MAX_TOKENS
    allow_files: Path | None = None  # local image paths are accepted only inside this folder
    # the Python API: PIL images and local paths anywhere (the caller's own files, in its own process)
    caller_images: bool = False


@dataclass
class ChatRequest:
    """A validated chat-completion request."""

    id: str
    model: str  # as asked: "mole" or an expert's name
    expert: str | None  # the forced expert, None to route
    sample: Sample
    max_tokens: int | None  # None: the expert's own max_new_tokens
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying where the JSON breaks."""
    try:
        obj = json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"request body is not UTF-8 text (byte {exc.start})", None, "invalid_json"
        ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            None,
            "invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise ApiError(
            400, f"request body must be a JSON object, got {type(obj).__name__}", None, "invalid_json"
        )
    return obj


def parse_chat_request(obj: dict, experts: list[str], limits: Limits) -> ChatRequest:
    """Validate a chat-completion request (the parsed JSON body) for a deployment with `experts`."""
    unknown = sorted(k for k in obj if k not in KNOWN_FIELDS)
    if unknown:
        raise ApiError(
            400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_field"
        )
    for key, off in OFF_VALUES.items():
        if key in obj and obj[key] not in off:
            raise ApiError(
                400, f"'{key}' is not supported by this server (leave it out or set it to {off[-1]!r})", key
            )
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "'model' is required: 'mole' to route, or an expert's name", "model", "missing_field"
        )
    if model != ROUTED_MODEL and model not in experts:
        raise ApiError(
            404,
            f"model '{model}' does not exist; served: {', '.join([ROUTED_MODEL, *experts])}",
            "model",
            "model_not_found",
        )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    sample = parse_messages(obj.get("messages"), limits, rid)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = obj.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(
            400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options"
        )
    return ChatRequest(
        id=rid,
        model=model,
        expert=None if model == ROUTED_MODEL else model,
        sample=sample,
        max_tokens=_max_tokens(obj, limits),
        temperature=_number(obj, "temperature", 0.0, *TEMPERATURE_RANGE),
        top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_seed(obj),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _max_tokens(obj: dict, limits: Limits) -> int | None:
    given = [k for k in ("max_completion_tokens", "max_tokens") if obj.get(k) is not None]
    if not given:
        return None
    key = given[0]
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_tokens:
        raise ApiError(
            400,
            f"'{key}' must be a whole number from 1 to {limits.max_tokens}, got {value!r}",
            key,
            "invalid_value",
        )
    return value


def _number(obj: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = obj.get(key)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        span = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
        raise ApiError(400, f"'{key}' must be a number {span}, got {value!r}", key, "invalid_value")
    return float(value)


def _seed(obj: dict) -> int | None:
    value = obj.get("seed")
    try:
        check_seed(value, "'seed'")
    except UserError as exc:
        raise ApiError(400, str(exc), "seed", "invalid_value") from None
    return value


def parse_messages(messages: Any, limits: Limits, rid: str = "request") -> Sample:
    """The conversation of `messages` as a Sample (images decoded), or an ApiError naming the field."""
    if not isinstance(messages, list) or not messages:
        got = (
            "an empty list" if messages == [] else "nothing" if messages is None else type(messages).__name__
        )
        raise ApiError(
            400,
            "'messages' is required: a list of {role, content} messages ending with the user's (got "
            f"{got})",
            "messages",
            "missing_field",
        )
    raw: list[RawTurn] = []
    urls: list[tuple[Any, str]] = []  # (url, where), in conversation order
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = "system" if m["role"] in SYSTEM_ROLES else m["role"]
        if role not in MESSAGE_ROLES:
            raise ApiError(
                400,
                f"{where}.role '{m['role']}' is not supported (system, developer, user or assistant)",
                f"{where}.role",
            )
        content = m["content"]
        if role == "user" and isinstance(content, list):
            content = _user_parts(content, f"{where}.content", urls, limits.caller_images)
        raw.append(RawTurn(role, content, f"{where}.role", f"{where}.content"))
    if raw[-1].role != "user":
        raise ApiError(
            400, f"the last message must be the user's turn to answer, got role '{raw[-1].role}'", "messages"
        )
    try:
        system, turns, _ = check_conversation(raw, MESSAGE_ROLES, None, request=True)
    except UserError as exc:
        raise ApiError(400, str(exc), "messages") from None
    placed = sum(p["type"] == "image" for t in turns if t["role"] == "user" for p in t["content"])
    if placed != len(urls):  # an <image> placeholder in a text string has no bytes behind it
        raise ApiError(
            400,
            f"the messages hold {placed - len(urls)} '<image>' placeholder(s) in text; send each image as "
            "an image_url part",
            "messages",
        )
    instruction = router_request(turns)
    if not instruction.strip():
        raise ApiError(400, "the user turns hold no text: the router needs the request's words", "messages")
    if len(urls) > limits.max_images:
        raise ApiError(
            400,
            f"the request holds {len(urls)} images; at most {limits.max_images} are accepted",
            "messages",
            "too_many_images",
        )
    images = [load_image(url, where, limits) for url, where in urls]
    return Sample(
        id=rid, images=images, instruction=instruction, answer="", source=rid, system=system, turns=turns
    )


def _user_parts(content: list, where: str, urls: list[tuple[Any, str]], caller_images: bool) -> list[dict]:
    """The parts of a user message in the form conversation.user_parts reads; image URLs go to `urls`
    (with `caller_images`, also PIL images and paths: load_image checks them)."""
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(part)  # conversation.user_parts checks the text
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if url is None or url == "" or not (isinstance(url, str) or caller_images):
                raise ApiError(400, f"{at}.image_url.url must be a non-empty string", f"{at}.image_url.url")
            urls.append((url, f"{at}.image_url.url"))
            parts.append({"type": "image"})
        else:
            raise ApiError(
                400,
                f"{at} must be a {{'type': 'text'}} or {{'type': 'image_url'}} part, got type {kind!r}",
                at,
            )
    return parts


def load_image(url: Any, where: str, limits: Limits):
    """Decode one image URL into an RGB PIL image, within the limits (with `limits.caller_images`,
    `url` may also be a PIL image or a path)."""
    import io

    if limits.caller_images and not isinstance(url, str):
        from PIL import Image

        if isinstance(url, Image.Image):
            _check_pixels(url.size, where, limits)
            return url.convert("RGB")
        if not isinstance(url, os.PathLike):
            raise ApiError(
                400,
                f"{where}: expected a data: URL, a path or a PIL image, got {type(url).__name__}",
                where,
                "invalid_image",
            )
        url = str(url)
    if url.startswith("data:"):
        data = _data_url_bytes(url, where)
        return decode_image(io.BytesIO(data), where, limits)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", url) and not url.startswith("file://"):
        raise ApiError(
            400,
            f"{where}: remote image URLs are not fetched by this server; send the image bytes as a "
            "data: URL (data:image/png;base64,...)",
            where,
            "unsupported_url",
        )
    if limits.caller_images:
        path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url).expanduser()
        if not path.is_file():
            raise ApiError(400, f"{where}: image file '{url}' not found", where, "invalid_image")
    else:
        path = _allowed_path(url, where, limits.allow_files)
    return decode_image(path, where, limits)


def _data_url_bytes(url: str, where: str) -> bytes:
    m = DATA_URL.fullmatch(url)
    if m is None or ";base64" not in m["params"]:
        raise ApiError(
            400, f"{where}: expected a base64 data URL like data:image/png;base64,...", where, "invalid_image"
        )
    try:
        return base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            400, f"{where}: the data URL is not valid base64 ({exc})", where, "invalid_base64"
        ) from None


def _allowed_path(url: str, where: str, allow: Path | None) -> Path:
    if allow is None:
        raise ApiError(
            403,
            f"{where}: local image paths are refused (the server was started without --allow-files); "
            "send the image as a data: URL",
            where,
            "file_not_allowed",
        )
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    root = Path(allow).resolve()
    path = (root / raw).resolve()  # an absolute `raw` replaces root; symlinks are followed
    if not path.is_relative_to(root):
        raise ApiError(
            403, f"{where}: '{raw}' is outside the allowed folder {root}", where, "file_not_allowed"
        )
    if not path.is_file():
        raise ApiError(400, f"{where}: image file '{raw}' not found in {root}", where, "invalid_image")
    return path


def decode_image(source, where: str, limits: Limits):
    """An RGB PIL image from a path or file object; its size is checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            _check_pixels(im.size, where, limits)
            im.load()
            return im.convert("RGB")
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError(
            400, f"{where}: the bytes are not an image PIL can read", where, "invalid_image"
        ) from None
    except Exception as exc:  # truncated or corrupt image data
        raise ApiError(
            400, f"{where}: the image cannot be decoded ({type(exc).__name__}: {exc})", where, "invalid_image"
        ) from None


def _check_pixels(size: tuple[int, int], where: str, limits: Limits) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise ApiError(
            400,
            f"{where}: the image is {width}x{height} = {width * height} pixels; at most "
            f"{limits.max_image_pixels} are accepted",
            where,
            "image_too_large",
        )
    try:
        check_image_size(width, height, where)
    except UserError as exc:
        raise ApiError(400, str(exc), where, "invalid_image") from None
