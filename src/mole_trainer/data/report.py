"""Plain-text tables of routing dataset statistics."""

from __future__ import annotations

from ..layout import SPLITS


def format_routing_stats(stats: dict) -> str:
    """Per-expert counts per split, duplicates and conflicts dropped, records left out for balance."""
    head = (
        f"{'expert':<16}"
        + "".join(f"{s:>7}" for s in SPLITS)
        + f"{'input':>8}{'dupes':>7}{'conflict':>9}{'unused':>8}"
    )
    lines = [head, "-" * len(head)]
    for e, c in stats["counts"].items():
        lines.append(
            f"{e:<16}"
            + "".join(f"{c[s]:>7}" for s in SPLITS)
            + f"{stats['input_records'][e]:>8}{stats['duplicates_dropped'][e]:>7}"
            + f"{stats['conflicts_dropped'][e]:>9}"
            + f"{stats['unused_for_balance'][e]:>8}"
        )
    lines.append(
        f"{stats['records']} records -> {stats['output']}; imbalance ratio {stats['imbalance_ratio']}"
    )
    lines.extend(f"warning: {w}" for w in stats.get("warnings", []))
    return "\n".join(lines)
