"""Tables of the routing dataset: the builder's stats and the `mole data check` summary (rich)."""

from __future__ import annotations

from ..layout import SPLITS


def routing_stats_table(stats: dict):
    """A rich Table: per expert the records per split, what was dropped, left unused, repeated, augmented."""
    from rich import box
    from rich.table import Table

    t = Table(
        title=f"routing dataset ({stats['strategy']}, oversample {'on' if stats['oversample'] else 'off'}, "
        f"seed {stats['seed']})",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,  # an 80-column terminal fits every column
    )
    t.add_column("expert", no_wrap=True)
    for sp in SPLITS:
        t.add_column(sp, justify="right")
    for col in ("input", "dupes", "conflicts", "unused", "repeats", "aug"):
        t.add_column(col, justify="right")
    for e, c in stats["counts"].items():
        t.add_row(
            e,
            *(str(c[sp]) for sp in SPLITS),
            str(stats["input_records"][e]),
            str(stats["duplicates_dropped"][e]),
            str(stats["conflicts_dropped"][e]),
            str(stats["unused_for_balance"][e]),
            str(stats["oversampled"][e]),
            str(stats["augmented"][e]),
        )
    return t


def print_routing_stats(stats: dict, console=None) -> None:
    """Print the stats table, the totals line and any warnings.

    repeats: oversampled train copies; augmented: rewritten train copies (both inside `train`).
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    console.print(routing_stats_table(stats))
    ratio, aug = stats["imbalance_ratio"], stats["augment"]
    console.print(
        f"{stats['records']} records -> {stats['output']}; imbalance ratio (max/min train) "
        f"{'undefined' if ratio is None else ratio}"
        + (
            f"; augment: {aug['copies']} rewritten cop{'y' if aug['copies'] == 1 else 'ies'} of "
            + (
                "every train record"
                if aug["fraction"] == 1
                else f"{aug['fraction']:.0%} of the train records"
            )
            + f" ({', '.join(aug['rewrites'])}; seed {aug['seed']})"
            if aug["copies"]
            else ""
        ),
        markup=False,
        soft_wrap=True,
    )
    for w in stats.get("warnings", []):
        console.print(f"warning: {w}", markup=False, soft_wrap=True, style="yellow")


def print_check_report(report: dict, console=None) -> None:
    """Print the `mole data check` summary: records per expert and split, images, warnings, verdict."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    label_map = report["label_map"] or {}
    t = Table(title=f"routing dataset check: {report['folder']}", box=box.SIMPLE_HEAD)
    t.add_column("expert", no_wrap=True)
    t.add_column("label", justify="right")
    for sp in SPLITS:
        t.add_column(sp, justify="right")
    for e in sorted(
        set(label_map) | set(report["counts"]), key=lambda e: (label_map.get(e, len(label_map)), e)
    ):
        c = report["counts"].get(e, {})
        t.add_row(e, str(label_map.get(e, "-")), *(str(c.get(sp, 0)) for sp in SPLITS))
    console.print(t)
    console.print(
        f"{report['records']} records in {len(report['files'])} file(s), {report['images']} image files "
        f"({report['distinct_images']} distinct by content), "
        f"{report['oversampled_repeats']} oversampled repeats, {report['augmented_copies']} augmented copies",
        markup=False,
        soft_wrap=True,
    )
    for w in report["warnings"]:
        console.print(f"warning: {w}", markup=False, soft_wrap=True, style="yellow")
    n = len(report["violations"])
    if n:
        console.print(f"{n} violation(s)", style="bold red")
    else:
        console.print(
            "ok: records parse, experts are in the label map, images decode, no image in two splits",
            style="green",
            soft_wrap=True,
        )
