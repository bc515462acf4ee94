"""Augmented routing records: rewritten copies of train instructions, so the router keys on what is
asked, not on punctuation, case or politeness.

A copy keeps its record's images, expert and split (train), so splits stay image-disjoint; only the
instruction changes (data/rewrites.py). Which records get copies and what each copy says depend on
the seed, the expert and the record id only, never on file order.
"""

from __future__ import annotations

import random

from ..config import AugmentSpec
from .rewrites import canonical, rewrite

AUGMENT_ID = "#aug{copy}"  # appended to a copy's routing id, like '#repeatN' for oversampled repeats
AUGMENT_METADATA = "augment_copy"  # metadata key holding the copy number


def plan_copies(ids: list[str], texts: list[str], spec: AugmentSpec, seed: int) -> list[tuple[int, int, str]]:
    """(index into `ids`, copy number 1..copies, rewritten text) of every copy to add, in `ids` order.

    `ids` are one expert's train records (routing ids, unique); a seeded `fraction` of them get
    `spec.copies` copies each. The copies of a record differ from it and from each other; a text the rewrites cannot
    change (enough) gets fewer.
    """
    if not spec.copies or not ids:
        return []
    chosen = range(len(ids))
    if spec.fraction < 1:
        n = int(spec.fraction * len(ids) + 0.5)
        # ranked by a seeded hash of the id: independent of the order records arrive in
        chosen = sorted(sorted(chosen, key=lambda i: random.Random(f"{seed}:pick:{ids[i]}").random())[:n])
    out = []
    for i in chosen:
        rng = random.Random(f"{seed}:{ids[i]}")
        made: set[str] = set()
        for copy in range(1, spec.copies + 1):
            text = rewrite(texts[i], spec.rewrites, rng, avoid=made)
            if text is None:
                break
            made.add(canonical(text))
            out.append((i, copy, text))
    return out
