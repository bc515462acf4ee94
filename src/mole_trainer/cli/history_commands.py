"""`mole history ...`: the run history (show, compare, report, plot, backfill)."""

from __future__ import annotations

import os
import sys

from .common import non_negative, print_json
from .registry import Command, Group


def _show_arguments(parser) -> None:
    parser.add_argument("--stage", default=None)
    parser.add_argument("--limit", type=non_negative, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--run",
        default=None,
        metavar="ID",
        help="everything recorded about this run (an id or unique prefix)",
    )


def _show(args, wd) -> None:
    if args.run:
        from ..history_view import format_run, read_history

        data = read_history(wd)
        run = data.run(args.run)
        if args.json:
            print_json({**run, "series": data.series(run["run_id"])})
        else:
            print(format_run(run, data))
        return
    from .. import stages
    from ..history import format_runs_table
    from ..layout import HISTORY_DB

    # a run whose process is gone shows (and is stored) as interrupted
    runs = stages.history_show(wd, args.stage, args.limit)
    if args.json:
        print_json(runs)
    else:
        print(format_runs_table(runs) if runs else f"no runs recorded in {os.path.join(wd, HISTORY_DB)}")


def _compare_arguments(parser) -> None:
    parser.add_argument("runs", nargs=2, metavar="RUN", help="run ids (or unique prefixes)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def _compare(args, wd) -> None:
    from ..history_view import compare_rows, format_compare, read_history

    data = read_history(wd)
    a, b = (data.run(r) for r in args.runs)
    if args.json:
        print_json([dict(zip(("field", "a", "b", "change"), row, strict=True)) for row in compare_rows(a, b)])
    else:
        print(format_compare(a, b))


def _report_arguments(parser) -> None:
    from ..layout import HISTORY_REPORT_FILE

    parser.add_argument(
        "--output", default=None, help=f"HTML file to write (default WORKDIR/{HISTORY_REPORT_FILE})"
    )


def _print_missing_figures(missing: dict) -> None:
    for name, why in missing.items():
        print(f"figure {name}: {why}", file=sys.stderr)


def _report(args, wd) -> None:
    from .. import stages

    result = stages.history_report(wd, args.output)
    _print_missing_figures(result["missing"])
    print(f"wrote {result['report']} ({result['runs']} runs, {len(result['figures'])} figures)")


def _plot_arguments(parser) -> None:
    parser.add_argument("--run", default=None, metavar="ID", help="only the figures of this run")
    parser.add_argument("--output-dir", required=True, help="folder for the PNG files")


def _plot(args, wd) -> None:
    from .. import stages

    result = stages.history_plot(wd, args.output_dir, args.run)
    _print_missing_figures(result["missing"])
    for path in result["files"]:
        print(f"wrote {path}")


def _backfill_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR")


def _backfill(args, wd) -> None:
    from .. import stages

    result = stages.history_backfill(args.dir, wd)
    for problem in result["problems"]:
        print(f"skipped: {problem}", file=sys.stderr)
    print(
        f"{result['found']} runs found below {args.dir}: {result['added']} added, "
        f"{result['already_present']} already in the history, {result['attached_to_recorded']} were "
        f"recorded runs (their curves attached); {result['metric_rows_added']} metric rows added"
    )


HISTORY = Group(
    "history",
    "run history",
    (
        Command("show", "every run of every stage, newest first", _show_arguments, _show),
        Command(
            "compare",
            "two runs side by side: fields, config changes, metric changes",
            _compare_arguments,
            _compare,
        ),
        Command(
            "report",
            "one self-contained HTML page: loss curves, router metrics, experts, runs and cost",
            _report_arguments,
            _report,
        ),
        Command("plot", "the report's figures as PNG files (of one run with --run)", _plot_arguments, _plot),
        Command(
            "backfill",
            "import past runs below DIR (train_log.jsonl, *_info.json, eval reports, TensorBoard, "
            "trainer_state.json); a second import adds nothing",
            _backfill_arguments,
            _backfill,
        ),
    ),
)
