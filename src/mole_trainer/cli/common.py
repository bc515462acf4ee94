"""What every `mole` sub-command shares: the parser class, argument value types and output helpers.

Nothing heavy is imported here; rich is imported only once a progress bar draws.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESUME_HELP = "continue from the newest checkpoint in the output folder (exactly, as if never stopped)"


class Parser(argparse.ArgumentParser):
    """argparse's own errors exit 2 like a UserError, after argparse's usage line."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def csv_list(value: str) -> list[str]:
    """`a, b,,c` -> ['a', 'b', 'c']."""
    return [v.strip() for v in value.split(",") if v.strip()]


def size(value: str) -> tuple[int, int]:
    """`448x336` -> (448, 336)."""
    try:
        w, h = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 448x336, got '{value}'") from None
    return w, h


def _whole(value: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{value}'") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected a number >= {least}, got {n}")
    return n


def non_negative(value: str) -> int:
    """A whole number >= 0."""
    return _whole(value, 0)


def at_least_one(value: str) -> int:
    """A whole number >= 1."""
    return _whole(value, 1)


def fraction(value: str) -> float:
    """A number in [0, 1]."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{value}'") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x:g}")
    return x


def seconds(value: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as the model-loading stages take them."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")


def print_json(obj) -> None:
    """Print a stage's result as indented JSON on stdout."""
    print(json.dumps(obj, indent=2, default=str))


def report_rejects(records: dict, output) -> None:
    """One stderr line: input, accepted and rejected record counts, and where the reasons are."""
    from ..layout import REJECTS_FILE

    line = f"{records['input']} records: {records['accepted']} accepted, {records['rejected']} rejected"
    if records["rejected"]:
        line += f" (reasons in {os.path.join(output, REJECTS_FILE)})"
    print(line, file=sys.stderr)


def progress_bar(label: str):
    """A progress(done, total) callback drawing a rich bar on stderr (nothing when not a terminal)."""
    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            console = Console(stderr=True)
            state["bar"] = Progress(
                f"[bold]{label}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=not console.is_terminal,
                transient=True,
            )
            state["task"] = state["bar"].add_task(label, total=total)
            state["bar"].start()
        state["bar"].update(state["task"], completed=done, total=total)
        if done >= total:
            state["bar"].stop()

    return update
