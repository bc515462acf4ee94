"""Qwen's chat tokens and template, as the tiny tokenizer is built with them.

Only the tiny model's builder uses these constants. Everything that works on a loaded model
(preprocessing, router scoring, generation) asks its tokenizer instead (`end_of_turn`), so a real
Qwen3-VL processor, or another base's, is never second-guessed by a copy of its tokens here.
"""

from __future__ import annotations

# Qwen's 14 special tokens, listed in Qwen's order (in the tiny model their ids follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD_TOKEN = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"

# Qwen-style chat template: string or list content, images as vision_start/image_pad/vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def end_of_turn(tokenizer) -> str:
    """The token that closes an assistant turn: the tokenizer's eos, where generation stops.

    Experts and the router are trained to write it after their answer, and router scoring scores it.
    """
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos token (the end of an assistant turn)")
    return tokenizer.eos_token
