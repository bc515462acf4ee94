"""Command-line options of a Modal stage function, for a local entrypoint that calls it.

`modal run APP::STAGE --option value` turns a function's parameters into options but discards what
the function returns; the app's entrypoint parses the same options itself (this module), so that it
can look at the result and exit non-zero on a returned error.
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable

SCALARS = (str, int, float, bool)  # the parameter types `modal run` accepts


def _scalar(hint) -> type:
    """The scalar type of a parameter annotated `T` or `T | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint not in SCALARS:
        raise TypeError(f"parameter type {hint!r}: a stage function takes only {SCALARS}")
    return hint


def options_parser(fn: Callable, prog: str) -> argparse.ArgumentParser:
    """A parser of `fn`'s parameters as `--dashed-name VALUE` options (`--flag/--no-flag` for booleans),
    each with the function's default, as `modal run` names them."""
    parser = argparse.ArgumentParser(prog=prog, description=inspect.getdoc(fn))
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        kind = _scalar(hints[param.name])
        flag = "--" + param.name.replace("_", "-")
        given = {"required": True} if param.default is inspect.Parameter.empty else {"default": param.default}
        if kind is bool:
            parser.add_argument(flag, dest=param.name, action=argparse.BooleanOptionalAction, **given)
        else:
            parser.add_argument(flag, dest=param.name, type=kind, metavar=kind.__name__.upper(), **given)
    return parser
