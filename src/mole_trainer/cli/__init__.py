"""`mole`: one sub-command per pipeline stage. Thin: parses arguments and calls mole_trainer.stages.

Each sub-command is a registry.Command: its arguments declared next to the handler that calls its stage,
in the *_commands modules; COMMANDS below is the table, in the order `mole --help` lists them.
Nothing heavy is imported at start-up, so `mole --help` answers at once. User mistakes
(UserError) print one line and exit with status 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from .common import Parser
from .data_commands import DATA
from .deploy_commands import DEPLOY
from .history_commands import HISTORY
from .registry import Command, Group, add_command
from .serve_commands import INFER, SERVE
from .start_commands import DEMO, INIT, MODEL
from .train_commands import EVAL, TEST, TRAIN

COMMANDS: tuple[Command | Group, ...] = (
    DEMO,
    INIT,
    MODEL,
    DATA,
    TRAIN,
    EVAL,
    TEST,
    DEPLOY,
    INFER,
    SERVE,
    HISTORY,
)


def build_parser() -> argparse.ArgumentParser:
    """The full `mole` argument parser, built from COMMANDS."""
    p = Parser(
        prog="mole",
        description="Mixture-of-LoRA-Experts training for Qwen3-VL: data, experts, "
        "router, evaluation, deployment, routed inference, run history.",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="folder holding the run history (history.sqlite); default $MOLE_WORKDIR or '.'",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for entry in COMMANDS:
        if isinstance(entry, Group):
            actions = sub.add_parser(entry.name, help=entry.help).add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
            for command in entry.commands:
                add_command(actions, command)
        else:
            add_command(sub, entry)
    return p


def _handler(command: str, action: str | None) -> Command:
    for entry in COMMANDS:
        if entry.name != command:
            continue
        if isinstance(entry, Command):
            return entry
        return next(c for c in entry.commands if c.name == action)
    raise ValueError(f"no such command: {command}")  # the parser admits only the names above


def run(args: argparse.Namespace) -> int:
    """Dispatch parsed arguments to the handler of their sub-command; its exit status."""
    wd = args.workdir or os.environ.get("MOLE_WORKDIR") or "."
    status = _handler(args.command, getattr(args, "action", None)).run(args, wd)
    return 0 if status is None else status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mole` command."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _quiet_libraries()
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Silence library progress bars and advice lines; our own output says what happens."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
