"""The server's request parser: OpenAI messages into a Sample, and each bad request refused with a 4xx."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mole_trainer.serve.errors import ApiError
from mole_trainer.serve.messages import Limits, parse_chat_request, parse_json_body

EXPERTS = ["calendar", "ocr"]


def png(size=(24, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def body(*, model="mole", text="Click on the 14th.", images=(), **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def refused(obj, limits=None, status=400) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat_request(obj, EXPERTS, limits or Limits())
    assert info.value.status == status, info.value.message
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}
    return info.value


def test_a_routed_request_becomes_a_sample_with_decoded_images():
    red, blue = png(color=(255, 0, 0)), png((8, 8), (0, 0, 255))
    obj = {
        "model": "mole",
        "messages": [
            {"role": "developer", "content": "You operate a calendar."},
            {"role": "user", "content": [image_part(red), {"type": "text", "text": "Open May"}]},
            {"role": "assistant", "content": "click(1, 2)"},
            {"role": "user", "content": [{"type": "text", "text": "Now"}, image_part(blue)]},
        ],
        "max_tokens": 7,
        "temperature": 0,
    }
    req = parse_chat_request(obj, EXPERTS, Limits())
    s = req.sample
    assert req.expert is None and req.max_tokens == 7 and req.temperature == 0.0 and not req.stream
    assert s.system == "You operate a calendar." and s.instruction == "Open May\nNow"
    assert [im.size for im in s.images] == [(24, 16), (8, 8)]
    assert s.images[0].mode == "RGB" and s.images[1].getpixel((0, 0)) == (0, 0, 255)
    # images stay where they stood in each turn: the expert sees the conversation as sent
    assert [p["type"] for p in s.turns[0]["content"]] == ["image", "text"]
    assert [p["type"] for p in s.turns[2]["content"]] == ["text", "image"]
    assert s.messages(with_answer=False)[-1]["role"] == "user"


def test_an_expert_name_forces_that_expert_and_defaults_apply():
    req = parse_chat_request(body(model="ocr", images=[data_url(png())]), EXPERTS, Limits())
    assert req.expert == "ocr" and req.max_tokens is None and req.top_p == 1.0 and req.seed is None
    req = parse_chat_request(
        body(max_completion_tokens=3, stream=True, stream_options={"include_usage": True}), EXPERTS, Limits()
    )
    assert req.max_tokens == 3 and req.stream and req.include_usage and req.sample.images == []


def test_local_files_only_inside_the_allowed_folder(tmp_path):
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    limits = Limits(allow_files=inside)
    for url in ("a.png", str(inside / "a.png"), f"file://{inside / 'a.png'}"):
        assert parse_chat_request(body(images=[url]), EXPERTS, limits).sample.images[0].size == (24, 16)
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    for url in ("../secret.png", str(tmp_path / "secret.png"), f"file://{tmp_path}/secret.png", "link.png"):
        assert refused(body(images=[url]), limits, 403).code == "file_not_allowed"
    err = refused(body(images=["a.png"]), Limits(), 403)  # no --allow-files: no local paths at all
    assert "--allow-files" in err.message
    assert refused(body(images=["missing.png"]), limits).code == "invalid_image"


@pytest.mark.parametrize(
    "obj, param, code, words",
    [
        ({"model": "mole"}, "messages", "missing_field", "'messages' is required"),
        ({"model": "mole", "messages": []}, "messages", "missing_field", "empty list"),
        (body(model=""), "model", "missing_field", "'model' is required"),
        (
            body(images=["data:image/png;base64,@@@not-base64"]),
            "messages[0].content[0].image_url.url",
            "invalid_base64",
            "not valid base64",
        ),
        (
            body(images=["data:image/png," + "abc"]),
            "messages[0].content[0].image_url.url",
            "invalid_image",
            "base64 data URL",
        ),
        (
            body(images=[data_url(b"plain text, not pixels")]),
            "messages[0].content[0].image_url.url",
            "invalid_image",
            "not an image",
        ),
        (
            body(images=[data_url(png()[:60])]),
            "messages[0].content[0].image_url.url",
            "invalid_image",
            "cannot be decoded",
        ),
        (
            body(images=["https://example.com/x.png"]),
            "messages[0].content[0].image_url.url",
            "unsupported_url",
            "not fetched",
        ),
        (body(max_tokens=0), "max_tokens", "invalid_value", "from 1 to 64"),
        (body(max_tokens=65), "max_tokens", "invalid_value", "from 1 to 64"),
        (body(max_tokens="5"), "max_tokens", "invalid_value", "whole number"),
        (body(temperature=3), "temperature", "invalid_value", "from 0 to 2"),
        (body(temperature=0.7, seed=2**64), "seed", "invalid_value", "from -9223372036854775808 to"),
        (body(seed=-(2**63) - 1), "seed", "invalid_value", "18446744073709551615"),
        (
            body(images=[data_url(png((1, 300)))]),
            "messages[0].content[0].image_url.url",
            "invalid_image",
            "1x300, an aspect ratio of 300",
        ),
        (body(top_p=0), "top_p", "invalid_value", "above 0"),
        (body(n=2), "n", None, "not supported"),
        (body(frobnicate=1), "frobnicate", "unknown_field", "unrecognized"),
        (body(text="   "), "messages", None, "the user turn is empty"),
        (body(text=" ", images=[data_url(png())]), "messages", None, "no text"),
        (body(text="look: <image>"), "messages", None, "placeholder"),
        (
            {"model": "mole", "messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role",
            None,
            "not supported",
        ),
        (
            {
                "model": "mole",
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            },
            "messages",
            None,
            "last message",
        ),
        (
            {
                "model": "mole",
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
            "messages",
            None,
            "messages[1].role must be",
        ),
        (
            {"model": "mole", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
            None,
            "'image_url'",
        ),
    ],
)
def test_each_bad_request_names_its_field(obj, param, code, words):
    err = refused(obj, Limits(max_tokens=64))
    assert err.param == param and err.code == code
    assert words in err.message


def test_unknown_model_is_404_listing_the_served_models():
    err = refused(body(model="gpt-4o"), status=404)
    assert err.code == "model_not_found" and "mole, calendar, ocr" in err.message
    assert err.body()["error"]["type"] == "not_found_error"


def test_image_limits_are_checked_before_decoding():
    big = data_url(png((100, 50)))
    err = refused(body(images=[big]), Limits(max_image_pixels=4999))
    assert err.code == "image_too_large" and "100x50 = 5000 pixels" in err.message
    assert parse_chat_request(body(images=[big]), EXPERTS, Limits(max_image_pixels=5000)).sample.images
    long = body(images=[data_url(png((200, 1)))], seed=2**64 - 1)  # the limits themselves pass
    assert parse_chat_request(long, EXPERTS, Limits()).sample.images[0].size == (200, 1)
    three = [data_url(png())] * 3
    assert refused(body(images=three), Limits(max_images=2)).code == "too_many_images"


def test_json_body_errors():
    with pytest.raises(ApiError, match="not valid JSON: Expecting value at line 1 column 11"):
        parse_json_body(b'{"model": }')
    with pytest.raises(ApiError, match="must be a JSON object, got list"):
        parse_json_body(b"[1]")
    with pytest.raises(ApiError, match="not UTF-8"):
        parse_json_body(b'{"a": "\xff"}')
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
