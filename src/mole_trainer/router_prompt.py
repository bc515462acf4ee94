"""The router's prompt and answers, built from the label map: the one place that defines them.

Training, evaluation and inference all call these functions, so the router sees exactly the same
input (instruction unmasked in the prompt, the label as the only supervised answer) everywhere.

What the router sees of a conversation (a Sample's `instruction` and `images`, defined once in
data.conversation.router_request): the text of every user turn, in order, one per line, without the
system prompt and the assistant turns; and every image of the conversation, in conversation
order, all placed before the routing instruction.
"""

from __future__ import annotations

# Bumped whenever the prompt a router reads changes; recorded with every router adapter, so a router
# trained on another prompt is noticed when loaded. 2: the request is read in lower case.
ROUTER_PROMPT_VERSION = 2

# The request comes last, right before the answer: the words that decide the route sit closest
# to the position where the label is predicted.
ROUTER_INSTRUCTION = (
    "Route the request to the expert that should handle it. Answer with the expert name only.\n"
    "Experts: {experts}.\n"
    "Request: {request}"
)


def label_names(label_map: dict[str, int]) -> list[str]:
    """Expert names in label-index order (index i -> names[i])."""
    names = sorted(label_map, key=label_map.__getitem__)
    if [label_map[n] for n in names] != list(range(len(names))):
        raise ValueError(f"label map indices must be 0..{len(names) - 1}, got {sorted(label_map.values())}")
    return names


def canonical_request(request: str) -> str:
    """The request as the router reads it: whitespace collapsed and letters in lower case.

    Neither spacing, line breaks nor case says which expert should answer, so the route must not
    depend on them; canonicalising makes that exact instead of learned (before it, the demo router
    agreed with itself on 0.72 of requests under extra whitespace and 0.96 under lower case).
    Punctuation and polite words are left to the router, trained on rewritten copies (augment).
    """
    return " ".join(request.split()).lower()


def router_messages(request: str, n_images: int, names: list[str]) -> list[dict]:
    """The user turn the router answers: the request's images plus the routing instruction."""
    text = ROUTER_INSTRUCTION.format(experts=", ".join(names), request=canonical_request(request))
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
