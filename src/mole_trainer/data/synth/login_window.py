"""Login-window expert: the next action (click or type) towards the requested goal."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from PIL import ImageFont

from .common import (
    _APPS,
    RGB,
    Box,
    _bar_h,
    _center,
    _desktop,
    _font,
    _place,
    _Screen,
    _shift,
    _text_w,
    _Theme,
    _theme,
    _to_1000,
    _window,
)

_USERS = (
    "jdoe", "alice", "bob.smith", "mchen", "priya", "omar_k", "lena", "tkato", "sam", "admin", "grace.h", "ivan",
)  # fmt: skip
_PASSWORD_WORDS = ("sunny", "tiger", "maple", "rocket", "violet", "cobalt", "pepper", "falcon")

_LOGIN_PROMPTS = {
    "login_as": (
        "Log in as {user}.",
        "Sign in as {user}.",
        "Sign in with the account {user}.",
        "Use the account {user} to log in.",
    ),
    "login_as_pw": ("Log in as {user} with password {pw}.", "Sign in: user {user}, password {pw}."),
    "type_username": (
        "Type the username {user}.",
        "Enter {user} in the {ulabel} field.",
        "Fill in the {ulabel} with {user}.",
    ),
    "type_password": (
        "Enter the password {pw}.",
        "Type {pw} into the password field.",
        "Fill in the password: {pw}",
    ),
    "submit": (
        "Press the {login} button.",
        "Click {login}.",
        "Submit the login form.",
        "Press the sign in button.",
    ),
    "cancel": ("Cancel the login.", "Click {cancel}.", "Close this dialog without logging in."),
    "forgot": ("I forgot my password.", "Click '{forgot}'.", "Open the password recovery link."),
    "remember": ("Tick 'Remember me'.", "Make the app remember me.", "Check the remember me box."),
    "focus_password": ("Click into the password field.", "Put the cursor in the password box."),
}
_LOGIN_STYLE_TRIES = 4
_LOGIN_WEIGHTS = {"login_as": 4, "login_as_pw": 3, "type_username": 2, "type_password": 2, "submit": 2}


@dataclass
class _LoginForm:
    """Texts and state of one login form."""

    heading: str
    user_label: str
    pass_label: str
    login: str
    cancel: str | None
    forgot: str | None
    remember: bool
    username: str  # what the username field holds ("" = empty)
    password_filled: bool


def _login_form(rng: random.Random, user: str) -> _LoginForm:
    app = rng.choice(_APPS)
    filled = rng.random() < 0.45
    username = (user if rng.random() < 0.7 else rng.choice(_USERS)) if filled else ""
    return _LoginForm(
        heading=rng.choice(("Sign in", "Log in", f"Log in to {app}", f"{app} account", "Welcome back")),
        user_label=rng.choice(("Username", "User name", "Email", "Login", "Account")),
        pass_label=rng.choice(("Password", "Your password")),
        login=rng.choice(("Log in", "Sign in", "Continue", "Log on", "Sign In")),
        cancel=rng.choice(("Cancel", "Close")) if rng.random() < 0.6 else None,
        forgot=rng.choice(("Forgot password?", "Reset password", "Trouble signing in?"))
        if rng.random() < 0.5
        else None,
        remember=rng.random() < 0.5,
        username=username,
        password_filled=bool(username) and rng.random() < 0.5,
    )


@dataclass(frozen=True)
class _LoginStyle:
    """Fonts, sizes and arrangement of a login form."""

    title_font: ImageFont.FreeTypeFont
    font: ImageFont.FreeTypeFont
    head_font: ImageFont.FreeTypeFont
    gap: int
    field_w: int
    field_h: int
    btn_h: int
    btn_pad: int
    pad: int  # between the window frame and the form
    labels_left: bool
    stacked_buttons: bool
    primary_last: bool


def _login_style(rng: random.Random, compact: bool) -> _LoginStyle:
    """A random style, or the smallest one (fits MIN_IMAGE_SIZE) when compact."""
    if compact:
        fs, head, gap, pad, labels_left, stacked = 11, 15, 5, 10, True, False
    else:
        fs, head, gap, pad = rng.randint(11, 15), rng.randint(15, 20), rng.randint(6, 12), rng.randint(12, 24)
        labels_left, stacked = rng.random() < 0.4, rng.random() < 0.5
    return _LoginStyle(
        title_font=_font(11 if compact else rng.randint(11, 13)),
        font=_font(fs),
        head_font=_font(head),
        gap=gap,
        field_w=rng.randint(140, 180 if compact else 210),
        field_h=fs + (8 if compact else rng.randint(8, 12)),
        btn_h=fs + (10 if compact else rng.randint(10, 14)),
        btn_pad=12 if compact else rng.randint(12, 20),
        pad=pad,
        labels_left=labels_left,
        stacked_buttons=stacked,
        primary_last=rng.random() < 0.5,
    )


def _login_layout(form: _LoginForm, st: _LoginStyle) -> tuple[dict[str, Box], int, int]:
    """Widget boxes relative to the form's top-left corner, and the form's width and height."""
    font, fs, gap = st.font, int(st.font.size), st.gap
    label_w = (
        max(_text_w(font, form.user_label), _text_w(font, form.pass_label)) + 10 if st.labels_left else 0
    )
    buttons = [("login", form.login)] + ([("cancel", form.cancel)] if form.cancel else [])
    btn_ws = [_text_w(font, t) + 2 * st.btn_pad for _, t in buttons]
    field_w = max(st.field_w, sum(btn_ws) + gap)
    boxes = {"heading": (0, 0, _text_w(st.head_font, form.heading), int(st.head_font.size) + 4)}
    y = boxes["heading"][3] + gap + 4
    for name, label in (("username", form.user_label), ("password", form.pass_label)):
        if st.labels_left:
            boxes[f"{name}_label"] = (0, y, label_w, y + st.field_h)
        else:
            boxes[f"{name}_label"] = (0, y, _text_w(font, label), y + fs + 2)
            y += fs + 6
        boxes[name] = (label_w, y, label_w + field_w, y + st.field_h)
        y += st.field_h + gap
    if form.remember:
        boxes["remember"] = (label_w, y, label_w + fs + 1, y + fs + 1)
        y += fs + 1 + gap
    if st.stacked_buttons:  # full field width, one under the other
        for name, _ in buttons:
            boxes[name] = (label_w, y, label_w + field_w, y + st.btn_h)
            y += st.btn_h + gap
    else:  # one row, right-aligned
        order = list(zip(buttons, btn_ws, strict=True))
        if st.primary_last:
            order.reverse()
        x = label_w + field_w - sum(btn_ws) - gap * (len(order) - 1)
        for (name, _), bw in order:
            boxes[name] = (x, y, x + bw, y + st.btn_h)
            x += bw + gap
        y += st.btn_h + gap
    if form.forgot:
        boxes["forgot"] = (label_w, y, label_w + _text_w(font, form.forgot), y + fs + 2)
        y += fs + 2
    return boxes, max(b[2] for b in boxes.values()), y


def _draw_login(
    rng, draw, theme: _Theme, form: _LoginForm, boxes: dict[str, Box], st: _LoginStyle, pw_len: int
) -> None:
    font, head_font = st.font, st.head_font
    draw.text(boxes["heading"][:2], form.heading, font=head_font, fill=theme.fg)
    radius = rng.randint(0, 6)
    shown = {"username": form.username, "password": "*" * pw_len if form.password_filled else ""}
    for name, label in (("username", form.user_label), ("password", form.pass_label)):
        lb = boxes[f"{name}_label"]
        draw.text((lb[0], (lb[1] + lb[3]) / 2), label, font=font, fill=theme.fg, anchor="lm")
        fb = boxes[name]
        draw.rounded_rectangle(fb, radius=radius, fill=theme.field, outline=theme.border)
        value = shown[name]
        text, colour = (value, theme.fg) if value else (f"Enter {label.lower()}", theme.muted)
        if value or rng.random() < 0.4:
            draw.text((fb[0] + 6, (fb[1] + fb[3]) / 2), text, font=font, fill=colour, anchor="lm")
    if form.remember:
        rb = boxes["remember"]
        draw.rectangle(rb, fill=theme.field, outline=theme.border)
        draw.text((rb[2] + 6, (rb[1] + rb[3]) / 2), "Remember me", font=font, fill=theme.fg, anchor="lm")
    _button(draw, boxes["login"], form.login, font, theme.accent, (255, 255, 255), None, radius)
    if form.cancel:
        _button(draw, boxes["cancel"], form.cancel, font, theme.field, theme.fg, theme.border, radius)
    if form.forgot:
        fb = boxes["forgot"]
        draw.text(fb[:2], form.forgot, font=font, fill=theme.accent)
        if rng.random() < 0.5:
            draw.line((fb[0], fb[3], fb[2], fb[3]), fill=theme.accent)


def _button(draw, box: Box, label: str, font, fill: RGB, text: RGB, outline: RGB | None, radius: int) -> None:
    draw.rounded_rectangle(box, radius=radius, fill=fill, outline=outline)
    draw.text(_center(box), label, font=font, fill=text, anchor="mm")


def _login_step(intent: str, form: _LoginForm, user: str, pw: str) -> tuple[str, str, str | None]:
    """(action name, target widget, typed text) of the next step towards the intent."""
    if intent in ("login_as", "login_as_pw") and form.username != user:
        return "type", "username", user
    if intent == "login_as_pw" and not form.password_filled:
        return "type", "password", pw
    if intent == "type_username":
        return "type", "username", user
    if intent == "type_password":
        return "type", "password", pw
    target = {"cancel": "cancel", "forgot": "forgot", "remember": "remember", "focus_password": "password"}
    return "click", target.get(intent, "login"), None


def _login_intents(form: _LoginForm, user: str) -> dict[str, int]:
    """Intents that make sense for this form, with their sampling weights."""
    weights = dict(_LOGIN_WEIGHTS)
    if form.username == user:
        del weights["type_username"]
    if form.password_filled:
        del weights["type_password"]
    for intent, present in (("cancel", form.cancel), ("forgot", form.forgot), ("remember", form.remember)):
        if present:
            weights[intent] = 1
    weights["focus_password"] = 1
    return weights


def _login_screen(rng: random.Random, size: tuple[int, int]) -> _Screen:
    img, draw, area = _desktop(rng, size)
    theme = _theme(rng)
    user, pw = rng.choice(_USERS), f"{rng.choice(_PASSWORD_WORDS)}{rng.randint(10, 99)}"
    form = _login_form(rng, user)
    for attempt in range(_LOGIN_STYLE_TRIES):  # the last try is the compact style, which always fits
        st = _login_style(rng, compact=attempt == _LOGIN_STYLE_TRIES - 1)
        rel, form_w, form_h = _login_layout(form, st)
        win_w, win_h = form_w + 2 * st.pad, _bar_h(st.title_font) + form_h + 2 * st.pad
        if win_w <= area[2] - area[0] and win_h <= area[3] - area[1]:
            break
    x0, y0 = _place(rng, area, win_w, win_h)
    content = _window(draw, theme, (x0, y0, x0 + win_w, y0 + win_h), form.heading, st.title_font)
    boxes = {k: _shift(b, x0 + st.pad, content[1] + st.pad) for k, b in rel.items()}
    _draw_login(rng, draw, theme, form, boxes, st, pw_len=rng.randint(6, 12))
    weights = _login_intents(form, user)
    intent = rng.choices(list(weights), weights=list(weights.values()))[0]
    name, target, text = _login_step(intent, form, user, pw)
    x, y = _to_1000(*_center(boxes[target]), size)
    action: dict[str, Any] = {"name": name, "x": x, "y": y}
    answer = f"click(x={x}, y={y})"
    if text is not None:
        action["text"] = text
        answer = f"type(x={x}, y={y}, text={json.dumps(text)})"
    instruction = rng.choice(_LOGIN_PROMPTS[intent]).format(
        user=user,
        pw=pw,
        ulabel=form.user_label.lower(),
        login=form.login,
        cancel=form.cancel,
        forgot=form.forgot,
    )
    meta = {
        "intent": intent,
        "action": action,
        "target": target,
        "username_value": form.username,
        "password_filled": form.password_filled,
        "boxes": {k: list(b) for k, b in boxes.items() if not k.endswith("_label") and k != "heading"},
    }
    return _Screen(img, instruction, answer, meta)
