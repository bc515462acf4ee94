"""The shape of the `mole` command table: a sub-command is its arguments next to its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One sub-command: `add_arguments(parser)` declares its options, `run(args, workdir)` calls its
    stage and prints; run returns the exit status (None means 0)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, str], int | None]
    description: str | None = None


@dataclass(frozen=True)
class Group:
    """A sub-command with actions (`mole data synth`): the action is stored as `args.action`."""

    name: str
    help: str
    commands: tuple[Command, ...]


def add_command(subparsers, command: Command) -> argparse.ArgumentParser:
    """Add `command` to an argparse sub-parsers object and declare its arguments."""
    parser = subparsers.add_parser(command.name, help=command.help, description=command.description)
    command.add_arguments(parser)
    return parser
