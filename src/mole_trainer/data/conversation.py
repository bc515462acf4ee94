"""Conversations: the turns of a record (messages, ShareGPT or alpaca form) checked and put in one form.

A conversation is an optional system prompt, then user and assistant turns in alternation, ending
with the assistant (an inference request may end with the user). User content becomes a list of
{type: image} and {type: text} parts with every image where its part or <image> placeholder
stood; system and assistant content become text. `router_request` defines what the router reads
of it. Problems are UserErrors naming the field (the caller adds the file and line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

# role names accepted in ShareGPT turns (LLaMA-Factory's defaults and the plain chat names)
SHAREGPT_USER = ("human", "user")
SHAREGPT_ASSISTANT = ("gpt", "assistant")
IMAGE_PLACEHOLDER = "<image>"

# role -> the names a messages-format record may give it
MESSAGE_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",),
    "user": ("user",),
    "assistant": ("assistant",),
}


@dataclass
class ShareGPTLayout:
    """Where a ShareGPT-style record keeps its parts (LLaMA-Factory's `columns` and `tags` mappings).

    The default accepts the usual spellings (from/role, value/content, human/user, gpt/assistant);
    a dataset_info.json entry names exactly one of each.
    """

    messages: str = "conversations"
    images: str = "images"
    system: str = "system"
    unsupported: tuple[str, ...] = ()  # fields a record may not use (LLaMA-Factory's tools, videos, audios)
    role_tags: tuple[str, ...] = ("from", "role")
    content_tags: tuple[str, ...] = ("value", "content")
    roles: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "system": ("system",),
            "user": SHAREGPT_USER,
            "assistant": SHAREGPT_ASSISTANT,
        }
    )


@dataclass
class AlpacaLayout:
    """Column names of an alpaca-style record (LLaMA-Factory's `formatting: alpaca`)."""

    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: str = "history"
    system: str = "system"
    images: str = "images"
    unsupported: tuple[str, ...] = ()


@dataclass
class RawTurn:
    """One turn as the record gives it, with where its role and content are (for messages)."""

    role: str  # as the record spells it
    content: Any
    role_at: str  # where the role is, for messages: "messages[2].role"
    content_at: str  # where the content is: "messages[2].content"


def user_parts(content: Any, where: str) -> tuple[list[dict], int, str]:
    """(parts, images, what they are called) of a user turn: images stay where they stand.

    A string may hold <image> placeholders; a list holds {type: image} and {type: text} parts. In a
    turn with images, text around them is stripped (the vision tokens delimit it); adjacent text
    parts are joined as the chat template renders them (no separator); empty texts are dropped.
    """
    raw: list[dict] = []
    if isinstance(content, str):
        pieces = content.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            raw.append({"type": "text", "text": piece})
            if j < len(pieces) - 1:
                raw.append({"type": "image"})
        what = f"{IMAGE_PLACEHOLDER} placeholder(s)"
    elif isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise UserError(f"{where}: content[{i}] must be an object with a 'type'")
            if part["type"] == "image":
                raw.append({"type": "image"})
            elif part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise UserError(f"{where}: content[{i}].text must be a string")
                if IMAGE_PLACEHOLDER in part["text"]:
                    raise UserError(
                        f"{where}: content[{i}].text holds an {IMAGE_PLACEHOLDER} placeholder; "
                        "in a list of parts an image is an {'type': 'image'} part"
                    )
                raw.append({"type": "text", "text": part["text"]})
            else:
                raise UserError(f"{where}: content[{i}].type '{part['type']}' is not 'image' or 'text'")
        what = "image part(s)"
    else:
        raise UserError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    n_images = sum(p["type"] == "image" for p in raw)
    parts: list[dict] = []
    for p in raw:
        if p["type"] == "text" and parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + p["text"]}
        else:
            parts.append(p)
    if n_images:
        parts = [{"type": "text", "text": p["text"].strip()} if p["type"] == "text" else p for p in parts]
    parts = [p for p in parts if p["type"] == "image" or p["text"].strip()]
    return parts, n_images, what


def plain_text(content: Any, where: str, what: str) -> str:
    """Text of a system or assistant turn (a string, or text parts joined as the template renders them)."""
    if isinstance(content, str):
        if IMAGE_PLACEHOLDER in content:
            raise UserError(f"{where}: {what} cannot hold an {IMAGE_PLACEHOLDER} placeholder")
        return content
    if not isinstance(content, list):
        raise UserError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise UserError(f"{where}: content[{i}] must be an object with a 'type'")
        if part["type"] != "text":
            raise UserError(f"{where}: content[{i}].type '{part['type']}': {what} holds text only")
        if not isinstance(part.get("text"), str):
            raise UserError(f"{where}: content[{i}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def router_request(turns: list[dict]) -> str:
    """What the router reads of a conversation: the text of every user turn, in order, joined with a
    newline (within a turn, its text parts joined the same way). The system prompt and the assistant
    turns are left out; the router also sees every image of the record, in conversation order."""
    return "\n".join(
        p["text"] for t in turns if t["role"] == "user" for p in t["content"] if p["type"] == "text"
    )


def raw_messages(obj: dict) -> list[RawTurn]:
    """The turns of a messages-format record (`messages: [{role, content}, ...]`)."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else type(messages).__name__
        raise UserError(
            "field 'messages' must be a non-empty list of turns: an optional system prompt, then user "
            f"and assistant turns in alternation, ending with the assistant (got {got})"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise UserError(f"messages[{i}].role must be a string")
        out.append(RawTurn(m["role"], m["content"], f"messages[{i}].role", f"messages[{i}].content"))
    return out


def raw_sharegpt(obj: dict, lay: ShareGPTLayout) -> list[RawTurn]:
    """The turns of a ShareGPT-style record, under the layout's column and tag names."""
    conv = obj.get(lay.messages)
    if not isinstance(conv, list) or not conv:
        got = "an empty list" if conv == [] else type(conv).__name__
        raise UserError(f"field '{lay.messages}' must be a non-empty list of turns (got {got})")
    out = []
    for i, t in enumerate(conv):
        rkey = next((k for k in lay.role_tags if isinstance(t, dict) and k in t), None)
        ckey = next((k for k in lay.content_tags if isinstance(t, dict) and k in t), None)
        if rkey is None or ckey is None or not isinstance(t[rkey], str) or not isinstance(t[ckey], str):
            raise UserError(
                f"{lay.messages}[{i}] must be an object with string '{lay.role_tags[0]}' and "
                f"'{lay.content_tags[0]}'"
            )
        out.append(RawTurn(t[rkey], t[ckey], f"{lay.messages}[{i}].{rkey}", f"{lay.messages}[{i}].{ckey}"))
    return out


def raw_alpaca(obj: dict, lay: AlpacaLayout) -> list[RawTurn]:
    """The turns of an alpaca record: its history pairs, then instruction + input and the output."""
    out = []
    history = obj.get(lay.history)
    if history is not None:
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history
        ):
            raise UserError(f"field '{lay.history}' must be a list of [request, answer] string pairs")
        for i, (q, a) in enumerate(history):
            at = f"{lay.history}[{i}]"
            out += [RawTurn("user", q, at, f"{at}[0]"), RawTurn("assistant", a, at, f"{at}[1]")]
    for key in (lay.prompt, lay.query, lay.response):
        if not isinstance(obj.get(key, ""), str):
            raise UserError(f"field '{key}' must be a string")
    # LLaMA-Factory's join of instruction and input
    request = "\n".join(x for x in (obj.get(lay.prompt, ""), obj.get(lay.query, "")) if x)
    out.append(RawTurn("user", request, lay.prompt, lay.prompt))
    out.append(RawTurn("assistant", obj.get(lay.response, ""), lay.response, lay.response))
    return out


def check_conversation(
    raw: list[RawTurn],
    roles: dict[str, tuple[str, ...]],
    system_field: tuple[str, Any] | None,
    request: bool,
) -> tuple[str | None, list[dict], list[tuple[str, int, str]]]:
    """(system prompt, turns, (where, images, what) per user turn) of a record's raw turns.

    Turns: an optional system prompt (a first system turn, or the record's system field), then
    user and assistant in alternation, ending with the assistant (or, for a request, either).
    """

    def canon(t: RawTurn) -> str | None:
        return next((role for role, names in roles.items() if t.role in names), None)

    known = ", ".join(n for names in roles.values() for n in names)
    for t in raw:
        if canon(t) is None:
            raise UserError(f"{t.role_at} '{t.role}' is not a known role (one of {known})")
    system = None
    if canon(raw[0]) == "system":
        if system_field is not None:
            raise UserError(
                f"{raw[0].role_at}: give the system prompt either in field '{system_field[0]}' or as a "
                "first system turn, not both"
            )
        system = plain_text(raw[0].content, raw[0].content_at, "the system prompt")
        where = raw[0].content_at
        raw = raw[1:]
    elif system_field is not None:
        where, system = system_field
        if not isinstance(system, str):
            raise UserError(f"field '{where}' (the system prompt) must be a string")
        where = f"field '{where}'"
    if system is not None and not system.strip():
        raise UserError(f"{where}: the system prompt is empty (leave it out for none)")
    if not raw:
        raise UserError("the conversation has a system prompt but no user turn")
    for t in raw:
        if canon(t) == "system":
            raise UserError(f"{t.role_at}: a system turn may only come first")
    if not request and canon(raw[-1]) != "assistant":
        raise UserError(f"the last message must be the assistant answer, got role '{raw[-1].role}'")
    for i, t in enumerate(raw):
        want = "user" if i % 2 == 0 else "assistant"
        if canon(t) != want:
            names = " or ".join(f"'{n}'" for n in roles[want])
            raise UserError(
                f"{t.role_at} must be {names} (after an optional system prompt, turns alternate user "
                f"and assistant, starting with the user), got '{t.role}'"
            )
    turns: list[dict] = []
    images: list[tuple[str, int, str]] = []
    for i, t in enumerate(raw):
        if canon(t) == "user":
            parts, n, what = user_parts(t.content, t.content_at)
            if not parts:
                raise UserError(f"{t.content_at}: the user turn is empty")
            turns.append({"role": "user", "content": parts})
            images.append((t.content_at, n, what))
        else:
            text = plain_text(t.content, t.content_at, "an assistant turn")
            if not text.strip():
                last = i == len(raw) - 1
                raise UserError(
                    "the assistant answer is empty"
                    if last
                    else f"{t.content_at}: the assistant turn is empty"
                )
            turns.append({"role": "assistant", "content": text})
    return system, turns, images


def placeholder_text(parts: list[dict]) -> str:
    """A user turn's parts as one string with <image> placeholders where the images stand.

    Text and placeholders are separated by a newline (the reader strips it again); adjacent
    placeholders are not.
    """
    out = ""
    for p in parts:
        if p["type"] == "image":
            out += ("" if not out or out.endswith(IMAGE_PLACEHOLDER) else "\n") + IMAGE_PLACEHOLDER
        else:
            out += ("\n" if out else "") + p["text"]
    return out
