"""What a request may ask of the engine, checked before any model work (no heavy imports).

The server (serve/messages.py), `mole infer` and the Python API refuse the same things with the
same numbers: each limit below is the one source of its value.
"""

from __future__ import annotations

from ..errors import UserError

TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; 0 is greedy
# torch.Generator.manual_seed takes a signed or unsigned 64-bit integer and overflows past them
SEED_RANGE = (-(2**63), 2**64 - 1)
# Qwen2-VL/Qwen3-VL image processors (transformers' qwen2_vl smart_resize) raise a ValueError when
# max(height, width) / min(height, width) > 200; that literal is not exported, tests pin it
MAX_ASPECT_RATIO = 200


def check_seed(seed, where: str) -> None:
    """Refuse a seed that is not a whole number torch can seed a generator with."""
    low, high = SEED_RANGE
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high):
        raise UserError(f"{where}: seed must be a whole number from {low} to {high}, got {seed!r}")


def check_image_size(width: int, height: int, where: str) -> None:
    """Refuse an image the vision processor cannot resize (empty, or too long and thin)."""
    if min(width, height) < 1:
        raise UserError(f"{where}: the image is {width}x{height}: it has no pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise UserError(
            f"{where}: the image is {width}x{height}, an aspect ratio of {ratio:g}; the vision "
            f"processor takes at most {MAX_ASPECT_RATIO}:1"
        )


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (`<|im_end|>`, `<|image_pad|>`, ...), longest first."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t), key=lambda t: (-len(t), t))


def check_text(text: str, tokens: list[str], where: str) -> None:
    """Refuse text holding a special token: the tokenizer would read it as the real token (a fake
    turn, or an image placeholder with no image behind it), not as the characters the user sent."""
    for token in tokens:
        if token in text:
            raise UserError(
                f"{where}: the text contains the special token '{token}'; special tokens are not "
                "accepted in messages"
            )
