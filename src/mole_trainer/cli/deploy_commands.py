"""`mole deploy`: upload a release (the flags form) or manage releases (list, promote, rollback, verify, gc)."""

from __future__ import annotations

import sys

from ..errors import UserError
from .common import Parser, fraction, non_negative, print_json, seconds
from .registry import Command, add_command


def _warn_unserialized(url: str) -> None:
    """Say on stderr when this destination cannot serialize concurrent writers (before writing to it)."""
    from ..storage import unserialized_note

    note = unserialized_note(url)
    if note:
        print(note, file=sys.stderr)


def _list_arguments(parser) -> None:
    parser.add_argument("url")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _list(args, wd) -> int:
    from .. import stages
    from ..storage import redact

    listing = stages.deploy_list(args.url)
    if args.json:
        print_json(listing)
        return 0
    url = redact(args.url)
    if not listing["releases"]:
        print(f"{url}: no releases" + (" (a flat-layout deployment is there)" if listing["flat"] else ""))
    for row in listing["releases"]:
        mark = "*" if row["current"] else "-" if row["previous"] else " "
        if row["complete"]:
            tail = (
                f"{row['created_at']}  {row['files']} files  {row['bytes']} bytes  {','.join(row['experts'])}"
            )
        else:
            tail = "incomplete (no manifest: an upload that did not finish)"
        print(f"{mark} {row['release']}  {tail}")
    return 0


def _promote_arguments(parser) -> None:
    parser.add_argument("url")
    parser.add_argument("release")


def _promote(args, wd) -> None:
    from .. import stages
    from ..storage import redact

    _warn_unserialized(args.url)
    result = stages.deploy_promote(args.url, args.release, wd)
    print(f"{redact(args.url)}: CURRENT -> {result['release']} (was {result['replaced']})")


def _rollback_arguments(parser) -> None:
    parser.add_argument("url")


def _rollback(args, wd) -> None:
    from .. import stages
    from ..storage import redact

    _warn_unserialized(args.url)
    result = stages.deploy_rollback(args.url, wd)
    print(f"{redact(args.url)}: CURRENT -> {result['release']} (rolled back from {result['replaced']})")


def _verify_arguments(parser) -> None:
    parser.add_argument("url")
    parser.add_argument("release", nargs="?", default=None)


def _verify(args, wd) -> int:
    from .. import stages
    from ..storage import redact

    url = redact(args.url)
    report = stages.deploy_verify(args.url, args.release)
    name = report["release"] or "(flat layout)"
    if report["ok"]:
        print(f"{url}: release {name}: all {report['files']} files match the manifest")
        return 0
    for path in report["mismatched"]:
        print(f"{url}: release {name}: {path}: changed (size or sha256 differ from the manifest)")
    for path in report["missing"]:
        print(f"{url}: release {name}: {path}: missing")
    return 1


def _gc_arguments(parser) -> None:
    from ..releases import INCOMPLETE_GRACE_S

    parser.add_argument("url")
    parser.add_argument(
        "--keep", type=non_negative, required=True, help="complete releases to keep, newest first"
    )
    parser.add_argument(
        "--grace",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="object stores: remove an incomplete release (an upload that may still be running) only "
        f"once older than this (default {INCOMPLETE_GRACE_S:g})",
    )


def _gc(args, wd) -> None:
    from .. import stages
    from ..storage import redact

    _warn_unserialized(args.url)
    result = stages.deploy_gc(args.url, args.keep, wd, args.grace)
    print(
        f"{redact(args.url)}: removed {len(result['removed'])} release(s) {result['removed']}; "
        f"kept {result['kept']}"
        + (
            f"; left incomplete (may be uploading): {result['left_incomplete']}"
            if result["left_incomplete"]
            else ""
        )
    )


ACTIONS = (
    Command(
        "list",
        "the releases at URL, oldest first; * marks CURRENT, - its predecessor",
        _list_arguments,
        _list,
    ),
    Command("promote", "point CURRENT at RELEASE (verified first)", _promote_arguments, _promote),
    Command("rollback", "point CURRENT back at the release it named before", _rollback_arguments, _rollback),
    Command(
        "verify",
        "re-hash a release (default: CURRENT's); exit 1 naming bad files",
        _verify_arguments,
        _verify,
    ),
    Command("gc", "remove old releases; never CURRENT or its predecessor", _gc_arguments, _gc),
)


def _deploy_arguments(parser) -> None:
    parser.add_argument("--checkpoint", default=None, help="router checkpoint folder (required to deploy)")
    parser.add_argument(
        "--experts",
        default=None,
        help="folder holding <expert>/adapter for every expert (required to deploy)",
    )
    parser.add_argument(
        "--bucket", default=None, help="destination: a folder or URL (s3://, gs://, file://, memory://)"
    )
    actions = parser.add_subparsers(dest="deploy_action", metavar="ACTION", parser_class=Parser)
    actions.required = False
    for action in ACTIONS:
        add_command(actions, action)
    parser.add_argument(
        "--min-accuracy",
        type=fraction,
        default=None,
        help="refuse (exit 1) a router whose recorded evaluation is below this: the `mole eval router` "
        "report of these weights (CHECKPOINT/eval_report.json or --eval-report), else router_info.json's "
        "validation accuracy; none recorded: refuse (exit 2)",
    )
    parser.add_argument(
        "--eval-report", default=None, help="the `mole eval router` report to check (written elsewhere)"
    )
    parser.add_argument("--force", action="store_true", help="deploy even below --min-accuracy")


def _deploy(args, wd) -> int | None:
    if args.deploy_action:
        return next(a for a in ACTIONS if a.name == args.deploy_action).run(args, wd)
    from .. import stages
    from ..eval.router_check import format_gate
    from ..storage import redact

    missing = [f"--{n}" for n in ("checkpoint", "experts", "bucket") if getattr(args, n) is None]
    if missing:
        raise UserError(
            f"deploy needs {', '.join(missing)} (or an action: list, promote, rollback, verify, gc)"
        )
    if args.eval_report and args.min_accuracy is None:
        raise UserError("--eval-report is read only with --min-accuracy")
    _warn_unserialized(args.bucket)
    manifest = stages.deploy(
        args.checkpoint, args.experts, args.bucket, wd, args.min_accuracy, args.force, args.eval_report
    )
    gate = manifest.get("router_gate")
    if gate:
        print(format_gate(gate))
    print(
        f"deployed release {manifest['release']}: {len(manifest['files'])} files "
        f"({', '.join(manifest['experts'])}) to {redact(args.bucket)}; CURRENT names it"
    )
    return None


DEPLOY = Command(
    "deploy",
    "upload router + experts + label map + checksummed manifest as a new release; manage releases",
    _deploy_arguments,
    _deploy,
    description="`mole deploy --checkpoint CKPT --experts DIR --bucket DEST` uploads a new release to "
    "DEST/releases/<id>/ and points DEST/CURRENT at it once it is read back intact. The actions below "
    "list, verify, promote, roll back and remove releases.",
)
