"""`mole demo`, `mole init` and `mole model tiny`: getting a work directory and a base model."""

from __future__ import annotations

import os

from .common import print_json
from .registry import Command, Group


def _demo_arguments(parser) -> None:
    parser.add_argument(
        "--workdir",
        dest="demo_workdir",
        default=None,
        help="where everything goes (default: the global --workdir if given, else runs/demo)",
    )
    parser.add_argument(
        "--force", action="store_true", help="re-run every stage even if its inputs did not change"
    )


def _demo(args, wd) -> None:
    from ..pipeline import run_demo

    run_demo(
        args.demo_workdir or args.workdir or os.environ.get("MOLE_WORKDIR") or "runs/demo",
        force=args.force,
    )


def _init_arguments(parser) -> None:
    parser.add_argument("--workdir", dest="init_workdir", required=True, help="work directory to create")
    parser.add_argument("--preset", default="demo", help="demo (tiny model), qwen3-vl-2b or qwen3-vl-8b")
    parser.add_argument("--force", action="store_true", help="overwrite existing config files")


def _init(args, wd) -> None:
    from ..configs import init_workdir

    for path in init_workdir(args.init_workdir, args.preset, args.force):
        print(f"wrote {path}")


def _tiny_arguments(parser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processor",
        default=None,
        metavar="DIR",
        help="build around this processor folder (a real Qwen3-VL's tokenizer, chat template and configs, "
        "no weights needed): its vocabulary, template and special-token ids; default: a local tokenizer",
    )


def _tiny(args, wd) -> None:
    from .. import stages

    print_json(stages.model_tiny(args.out, wd, args.seed, args.processor))


DEMO = Command(
    "demo",
    "run the whole pipeline on the embedded default (tiny model, synthetic data)",
    _demo_arguments,
    _demo,
)
INIT = Command(
    "init",
    "write the config files of a work directory (demo or a real-model preset)",
    _init_arguments,
    _init,
)
MODEL = Group(
    "model",
    "base models",
    (
        Command(
            "tiny",
            "build the tiny offline Qwen3-VL (random weights; local tokenizer or --processor DIR)",
            _tiny_arguments,
            _tiny,
        ),
    ),
)
