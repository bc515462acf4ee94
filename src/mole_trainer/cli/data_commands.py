"""`mole data ...`: synthetic data, routing datasets, checks, OCR crops, preprocessing, conversion."""

from __future__ import annotations

from .common import at_least_one, csv_list, non_negative, print_json, progress_bar, report_rejects, size
from .registry import Command, Group

STRICT_HELP = "fail on the first bad record instead of listing it in OUTPUT/rejects.jsonl"


def _synth_arguments(parser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--experts", type=csv_list, default=None, help="comma-separated subset (default: all)"
    )
    for split, n in (("train", 120), ("val", 16), ("test", 32)):
        parser.add_argument(
            f"--{split}", type=non_negative, default=None, help=f"{split} records per expert ({n})"
        )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=size, default=None, help="image size WIDTHxHEIGHT (448x336)")


def _synth(args, wd) -> None:
    from .. import stages

    counts = {"train": args.train, "val": args.val, "test": args.test}
    print_json(stages.data_synth(args.out, wd, args.experts, counts, args.seed, args.size))


def _routing_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="dataset.yaml")
    parser.add_argument(
        "--output", required=True, help="routing JSONL to write (label map written beside it)"
    )


def _routing(args, wd) -> None:
    from .. import stages
    from ..data.report import print_routing_stats

    print_routing_stats(stages.data_routing(args.config, args.output, wd))


def _check_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="routing dataset folder (or its routing JSONL)")


def _check(args, wd) -> None:
    from .. import stages
    from ..data.check import DataCheckFailed
    from ..data.report import print_check_report

    try:
        report = stages.data_check(args.dir, wd)
    except DataCheckFailed as exc:
        print_check_report(exc.report)
        raise
    print_check_report(report)


def _ocr_arguments(parser) -> None:
    from ..data.ocr import DEFAULT_PADDING  # light: no image library at import
    from ..data.ocr_engines import DEFAULT_JOIN_GAP, DEFAULT_MIN_CONFIDENCE, ENGINES

    parser.add_argument("--input", required=True, help="expert dataset folder or folder of images")
    parser.add_argument(
        "--output", required=True, help="new folder: {train,val,test}.jsonl, unlabeled.jsonl, images/"
    )
    parser.add_argument("--boxes-out", default=None, help="also write every box as JSONL here")
    parser.add_argument(
        "--padding",
        type=non_negative,
        default=None,
        help=f"pixels added around each text box ({DEFAULT_PADDING})",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="rapidocr: PP-OCRv4 boxes + text (default when installed); opencv: boxes only, no text",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help=f"rapidocr lines read at least this sure become training records, the rest unlabeled "
        f"({DEFAULT_MIN_CONFIDENCE})",
    )
    parser.add_argument(
        "--join-gap",
        type=float,
        default=None,
        help=f"rapidocr: a row of two pieces at most this many text heights apart is one line (an item and "
        f"its price; {DEFAULT_JOIN_GAP}); 0 keeps PP-OCR's boxes",
    )


def _ocr(args, wd) -> None:
    from .. import stages
    from ..data.ocr import format_ocr_summary

    summary = stages.data_ocr_crops(
        args.input,
        args.output,
        wd,
        args.padding,
        args.boxes_out,
        args.engine,
        args.min_confidence,
        args.join_gap,
    )
    print(format_ocr_summary(summary))


def _preprocess_arguments(parser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="expert dataset folder (or DIR#NAME of a LLaMA-Factory folder) or routing JSONL",
    )
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=None, help="base model folder or hub id (its processor is used)")
    parser.add_argument(
        "--config",
        default=None,
        help="router.yaml (or loras.yaml): its base_model and image pixel budget are the defaults",
    )
    parser.add_argument(
        "--task",
        choices=["sft", "router"],
        default=None,
        help="sft (expert answers) or router (expert labels); default: router for a JSONL, else sft",
    )
    parser.add_argument(
        "--label-map", default=None, help="label map (default: label_map.json beside the input)"
    )
    parser.add_argument("--min-pixels", type=at_least_one, default=None)
    parser.add_argument("--max-pixels", type=at_least_one, default=None)
    parser.add_argument(
        "--workers", type=at_least_one, default=1, help="processes encoding in parallel (default 1)"
    )
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _preprocess(args, wd) -> None:
    from pathlib import Path

    from .. import stages

    task = args.task or ("router" if Path(args.input).is_file() else "sft")
    meta = stages.data_preprocess(
        args.input,
        args.output,
        args.model,
        task,
        args.label_map,
        args.min_pixels,
        args.max_pixels,
        wd,
        config=args.config,
        workers=args.workers,
        strict=args.strict,
        progress=progress_bar("preprocessing"),
    )
    print_json(meta)
    report_rejects(meta["records"], args.output)


def _convert_arguments(parser) -> None:
    parser.add_argument(
        "--input", required=True, help="dataset folder in any format mole reads (DIR#NAME: LLaMA-Factory)"
    )
    parser.add_argument("--output", required=True, help="folder to write (train/val/test + images/)")
    parser.add_argument(
        "--to",
        choices=["messages", "sharegpt", "hf"],
        default="messages",
        help="messages JSONL (default), ShareGPT JSONL, or a Hugging Face datasets folder (save_to_disk)",
    )
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _convert(args, wd) -> None:
    from .. import stages

    result = stages.data_convert(args.input, args.output, args.to, wd, strict=args.strict)
    print_json(result)
    report_rejects(result["records"], args.output)


DATA = Group(
    "data",
    "datasets",
    (
        Command("synth", "write synthetic GUI expert datasets", _synth_arguments, _synth),
        Command(
            "routing", "merge expert datasets into a balanced routing dataset", _routing_arguments, _routing
        ),
        Command(
            "check",
            "verify a routing dataset: no image in two splits, label map, images decode",
            _check_arguments,
            _check,
        ),
        Command(
            "ocr-crops",
            "crop text lines (known boxes, else read by an OCR engine) into an OCR expert dataset",
            _ocr_arguments,
            _ocr,
        ),
        Command(
            "preprocess",
            "chat template + processor + label masks, cached for training",
            _preprocess_arguments,
            _preprocess,
        ),
        Command(
            "convert",
            "write a dataset (messages/ShareGPT JSONL or HF datasets folder) in another format",
            _convert_arguments,
            _convert,
        ),
    ),
)
