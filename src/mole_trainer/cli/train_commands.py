"""`mole train ...`, `mole eval router` and `mole test router`: the adapters and their checks."""

from __future__ import annotations

from ..train.distributed import env_rank
from .common import RESUME_HELP, at_least_one, csv_list, device_options, fraction, print_json
from .registry import Command, Group

CHECKPOINT_HELP = "router checkpoint (or adapter) folder"
SPLIT_HELP = "records of this split when records carry one (default test)"
BASE_MODEL_HELP = "base to load instead of the one the router recorded"


def _experts_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="loras.yaml")
    parser.add_argument("--only", type=csv_list, default=None, help="comma-separated subset of experts")
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="train all experts together in one pass over one copy of the base (one batch mixes them)",
    )
    device_options(parser)


def _experts(args, wd) -> None:
    from .. import stages

    results = stages.train_experts(
        args.config,
        wd,
        args.only,
        args.device,
        args.dtype,
        resume=args.resume,
        concurrent=args.concurrent,
    )
    if env_rank() == 0:  # under torchrun, one summary (rank 0 wrote the adapters)
        print_json(
            {
                n: {k: r[k] for k in ("adapter", "metric", "value", "base_value", "best_val_loss")}
                for n, r in results.items()
            }
        )


def _router_arguments(parser) -> None:
    parser.add_argument("--dataset-path", required=True, help="preprocessed router dataset folder")
    parser.add_argument("--config", required=True, help="router.yaml")
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    device_options(parser)


def _router(args, wd) -> None:
    from .. import stages

    info = stages.train_router(
        args.dataset_path, args.config, wd, args.device, args.dtype, resume=args.resume
    )
    if env_rank() == 0:  # under torchrun, one summary (rank 0 wrote the adapter)
        print_json({k: info[k] for k in ("adapter", "best", "best_step", "steps", "label_map")})


def _eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--test-data", required=True, help="routing JSONL")
    parser.add_argument("--split", default="test", help=SPLIT_HELP)
    parser.add_argument("--output", default=None, help="report JSON (default CHECKPOINT/eval_report.json)")
    parser.add_argument("--batch-size", type=at_least_one, default=8)
    parser.add_argument("--base-model", default=None, help=BASE_MODEL_HELP)
    parser.add_argument(
        "--consistency",
        action="store_true",
        help="also measure routing consistency (alone vs batched, benign perturbations)",
    )
    device_options(parser)


def _eval(args, wd) -> None:
    from .. import stages
    from ..eval.report import format_router_report

    report = stages.eval_router(
        args.checkpoint,
        args.test_data,
        args.output,
        args.split or None,
        wd,
        args.batch_size,
        args.device,
        args.dtype,
        args.consistency,
        args.base_model,
    )
    print(format_router_report(report))


def _test_arguments(parser) -> None:
    from ..eval.router_check import DEFAULT_PER_EXPERT  # light: no model library at import

    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--test-data", required=True, help="routing JSONL")
    parser.add_argument(
        "--per-expert",
        type=at_least_one,
        default=DEFAULT_PER_EXPERT,
        help=f"test records per expert, the same ones every time ({DEFAULT_PER_EXPERT})",
    )
    parser.add_argument(
        "--min-accuracy",
        type=fraction,
        default=None,
        help="exit 1 when the overall accuracy is below this (0..1); without it, exit 0",
    )
    parser.add_argument("--split", default="test", help=SPLIT_HELP)
    parser.add_argument("--batch-size", type=at_least_one, default=8)
    parser.add_argument("--base-model", default=None, help=BASE_MODEL_HELP)
    device_options(parser)


def _test(args, wd) -> int:
    from .. import stages
    from ..eval.router_check import format_router_test

    result = stages.test_router(
        args.checkpoint,
        args.test_data,
        args.per_expert,
        args.min_accuracy,
        args.split or None,
        wd,
        args.batch_size,
        args.device,
        args.dtype,
        args.base_model,
    )
    print(format_router_test(result))
    return 0 if result["passed"] else 1


TRAIN = Group(
    "train",
    "training",
    (
        Command("experts", "train one LoRA per expert of loras.yaml", _experts_arguments, _experts),
        Command("router", "train the router adapter", _router_arguments, _router),
    ),
)
EVAL = Group(
    "eval",
    "evaluation",
    (
        Command(
            "router",
            "accuracy, top-k, per-expert P/R/F1, confusion, calibration",
            _eval_arguments,
            _eval,
        ),
    ),
)
TEST = Group(
    "test",
    "quick checks before a deploy (exit 1 below the threshold)",
    (
        Command(
            "router",
            "route a small held-out sample per expert; per-expert and overall accuracy",
            _test_arguments,
            _test,
        ),
    ),
)
