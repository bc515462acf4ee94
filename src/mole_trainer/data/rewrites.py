"""Benign rewrites of a request's text: what a user may change without changing what they ask for.

One source for both uses: the routing dataset's augmentation (data/augment.py) draws from them, and
the consistency evaluation (eval/consistency.py) measures the router under some of them.
"""

from __future__ import annotations

import random

FINAL_PUNCTUATION = ".?!"
# polite prefixes for a command, each with the final mark it gives the request (None: keep it)
COMMAND_PREFIXES = {
    "Please ": None,
    "Kindly ": None,
    "Could you ": "?",
    "Can you please ": "?",
    "Would you ": "?",
}
# and for a question ("Which bar is highest?")
QUESTION_PREFIXES = {"Could you tell me ": "?", "Can you tell me ": "?", "Please tell me ": None}
COMMAND_SUFFIXES = (", thanks.", ", please.", ". Thank you!", ", thank you.", " please")
QUESTION_SUFFIXES = ("? Thanks.", "? Thank you!", ", please?")
# the consistency evaluation's polite-prefix perturbation: one fixed prefix per kind of request
EVAL_PREFIX = {"command": "Please ", "question": "Could you tell me "}


def is_question(text: str) -> bool:
    """Whether the request reads as a question (it ends with '?')."""
    return text.rstrip().endswith("?")


def lower_first(text: str) -> str:
    """The first letter in lower case, unless the first word is an acronym or a name like 'OK' or 'iOS'."""
    first = text.split(" ", 1)[0]
    if not first[:1].isupper() or sum(c.isupper() for c in first) > 1:
        return text
    return text[:1].lower() + text[1:]


def without_final_mark(text: str) -> str:
    """The text without its trailing punctuation marks (and the spaces before them)."""
    return text.rstrip().rstrip(FINAL_PUNCTUATION).rstrip()


def toggle_final_mark(text: str) -> str:
    """'Read it.' -> 'Read it' and 'Read it' -> 'Read it.'."""
    text = text.rstrip()
    return text[:-1] if text[-1:] in FINAL_PUNCTUATION else text + "."


def with_prefix(text: str, prefix: str) -> str:
    """`prefix` + the request with its first letter lowered (and the final mark the prefix calls for)."""
    mark = {**COMMAND_PREFIXES, **QUESTION_PREFIXES}.get(prefix)
    body = lower_first(text.strip())
    return prefix + (without_final_mark(body) + mark if mark else body)


def politely(text: str) -> str:
    """The consistency evaluation's polite form: 'Please click X.', 'Could you tell me which bar ...?'."""
    return with_prefix(text, EVAL_PREFIX["question" if is_question(text) else "command"])


def _punctuation(text: str, rng: random.Random) -> str:
    body, mark = without_final_mark(text), text.rstrip()[-1:]
    if mark not in FINAL_PUNCTUATION:
        return body + rng.choice(".!")
    return rng.choice((body, body + mark * 2, body + ("!" if mark == "." else ".")))


def _polite(text: str, rng: random.Random) -> str:
    question = is_question(text)
    if rng.random() < 0.6:
        return with_prefix(text, rng.choice(list(QUESTION_PREFIXES if question else COMMAND_PREFIXES)))
    return without_final_mark(text) + rng.choice(QUESTION_SUFFIXES if question else COMMAND_SUFFIXES)


# the rewrite families dataset.yaml's `augment.rewrites` can name. No case family: the router prompt
# reads the request in lower case (router_prompt.canonical_request), so a case change is no new copy.
REWRITES = {"punctuation": _punctuation, "polite": _polite}
# the order they apply in: politeness reads the request's own final mark (a question gets a question's
# prefix), which the punctuation rewrite may change afterwards
APPLY_ORDER = ("polite", "punctuation")


def canonical(text: str) -> str:
    """The text as the router prompt reads it (router_prompt.canonical_request: whitespace collapsed,
    lower case), so a rewrite the router cannot see (case alone) never counts as a new copy."""
    from ..router_prompt import canonical_request

    return canonical_request(text)


def rewrite(
    text: str, families: list[str], rng: random.Random, avoid: set[str] | None = None, attempts: int = 8
) -> str | None:
    """A rewrite of `text` by a random non-empty subset of `families` (in APPLY_ORDER), or None.

    The result differs from `text` beyond whitespace and from every (canonical) text in `avoid`;
    None when no attempt found one (a text the families cannot change).
    """
    avoid = {canonical(text), *(avoid or ())}
    for _ in range(attempts):
        chosen = [f for f in families if rng.random() < 0.5] or [rng.choice(families)]
        out = text
        for f in sorted(chosen, key=APPLY_ORDER.index):
            out = REWRITES[f](out, rng)
        if canonical(out) not in avoid and canonical(without_final_mark(out)):
            return out
    return None
