"""`mole`: one sub-command per pipeline stage. Thin: parses arguments and calls mole_trainer.stages.

Nothing heavy is imported at start-up, so `mole --help` answers at once. User mistakes
(UserError) print one line and exit with status 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError
from .train.distributed import env_rank

RESUME_HELP = "continue from the newest checkpoint in the output folder (exactly, as if never stopped)"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _size(value: str) -> tuple[int, int]:
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


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{value}'") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {x:g}")
    return x


def _positive(value: str) -> int:
    return _whole(value, 0)


def _at_least_one(value: str) -> int:
    return _whole(value, 1)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors exit 2 too; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full `mole` argument parser."""
    p = _Parser(
        prog="mole",
        description="Mixture-of-LoRA-Experts training for Qwen3-VL: data, experts, "
        "router, evaluation, deployment, routed inference, run history.",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="folder holding the run history (history.sqlite); default $MOLE_WORKDIR or '.'",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def device_opts(sp):
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        sp.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")

    demo = sub.add_parser(
        "demo", help="run the whole pipeline on the embedded default (tiny model, synthetic data)"
    )
    demo.add_argument(
        "--workdir",
        dest="demo_workdir",
        default=None,
        help="where everything goes (default: the global --workdir if given, else runs/demo)",
    )
    demo.add_argument(
        "--force", action="store_true", help="re-run every stage even if its inputs did not change"
    )

    init = sub.add_parser(
        "init", help="write the config files of a work directory (demo or a real-model preset)"
    )
    init.add_argument("--workdir", dest="init_workdir", required=True, help="work directory to create")
    init.add_argument("--preset", default="demo", help="demo (tiny model), qwen3-vl-2b or qwen3-vl-8b")
    init.add_argument("--force", action="store_true", help="overwrite existing config files")

    model = sub.add_parser("model", help="base models").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    tiny = model.add_parser(
        "tiny", help="build the tiny offline Qwen3-VL (random weights; local tokenizer or --processor DIR)"
    )
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--processor",
        default=None,
        metavar="DIR",
        help="build around this processor folder (a real Qwen3-VL's tokenizer, chat template and configs, "
        "no weights needed): its vocabulary, template and special-token ids; default: a local tokenizer",
    )

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    synth = data.add_parser("synth", help="write synthetic GUI expert datasets")
    synth.add_argument("--out", required=True)
    synth.add_argument("--experts", type=_csv, default=None, help="comma-separated subset (default: all)")
    for split, n in (("train", 120), ("val", 16), ("test", 32)):
        synth.add_argument(
            f"--{split}", type=_positive, default=None, help=f"{split} records per expert ({n})"
        )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=_size, default=None, help="image size WIDTHxHEIGHT (448x336)")
    routing = data.add_parser("routing", help="merge expert datasets into a balanced routing dataset")
    routing.add_argument("--config", required=True, help="dataset.yaml")
    routing.add_argument(
        "--output", required=True, help="routing JSONL to write (label map written beside it)"
    )
    check = data.add_parser(
        "check", help="verify a routing dataset: no image in two splits, label map, images decode"
    )
    check.add_argument("dir", metavar="DIR", help="routing dataset folder (or its routing JSONL)")
    from .data.ocr import DEFAULT_PADDING  # light: no image library at import
    from .data.ocr_engines import DEFAULT_JOIN_GAP, DEFAULT_MIN_CONFIDENCE, ENGINES

    ocr = data.add_parser(
        "ocr-crops",
        help="crop text lines (known boxes, else read by an OCR engine) into an OCR expert dataset",
    )
    ocr.add_argument("--input", required=True, help="expert dataset folder or folder of images")
    ocr.add_argument(
        "--output", required=True, help="new folder: {train,val,test}.jsonl, unlabeled.jsonl, images/"
    )
    ocr.add_argument("--boxes-out", default=None, help="also write every box as JSONL here")
    ocr.add_argument(
        "--padding",
        type=_positive,
        default=None,
        help=f"pixels added around each text box ({DEFAULT_PADDING})",
    )
    ocr.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="rapidocr: PP-OCRv4 boxes + text (default when installed); opencv: boxes only, no text",
    )
    ocr.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help=f"rapidocr lines read at least this sure become training records, the rest unlabeled "
        f"({DEFAULT_MIN_CONFIDENCE})",
    )
    ocr.add_argument(
        "--join-gap",
        type=float,
        default=None,
        help=f"rapidocr: a row of two pieces at most this many text heights apart is one line (an item and "
        f"its price; {DEFAULT_JOIN_GAP}); 0 keeps PP-OCR's boxes",
    )
    prep = data.add_parser("preprocess", help="chat template + processor + label masks, cached for training")
    prep.add_argument(
        "--input",
        required=True,
        help="expert dataset folder (or DIR#NAME of a LLaMA-Factory folder) or routing JSONL",
    )
    prep.add_argument("--output", required=True)
    prep.add_argument("--model", default=None, help="base model folder or hub id (its processor is used)")
    prep.add_argument(
        "--config",
        default=None,
        help="router.yaml (or loras.yaml): its base_model and image pixel budget are the defaults",
    )
    prep.add_argument(
        "--task",
        choices=["sft", "router"],
        default=None,
        help="sft (expert answers) or router (expert labels); default: router for a JSONL, else sft",
    )
    prep.add_argument(
        "--label-map", default=None, help="label map (default: label_map.json beside the input)"
    )
    prep.add_argument("--min-pixels", type=_at_least_one, default=None)
    prep.add_argument("--max-pixels", type=_at_least_one, default=None)
    prep.add_argument(
        "--workers", type=_at_least_one, default=1, help="processes encoding in parallel (default 1)"
    )
    prep.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first bad record instead of listing it in OUTPUT/rejects.jsonl",
    )
    convert = data.add_parser(
        "convert", help="write a dataset (messages/ShareGPT JSONL or HF datasets folder) in another format"
    )
    convert.add_argument(
        "--input", required=True, help="dataset folder in any format mole reads (DIR#NAME: LLaMA-Factory)"
    )
    convert.add_argument("--output", required=True, help="folder to write (train/val/test + images/)")
    convert.add_argument(
        "--to",
        choices=["messages", "sharegpt", "hf"],
        default="messages",
        help="messages JSONL (default), ShareGPT JSONL, or a Hugging Face datasets folder (save_to_disk)",
    )
    convert.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first bad record instead of listing it in OUTPUT/rejects.jsonl",
    )

    train = sub.add_parser("train", help="training").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    experts = train.add_parser("experts", help="train one LoRA per expert of loras.yaml")
    experts.add_argument("--config", required=True, help="loras.yaml")
    experts.add_argument("--only", type=_csv, default=None, help="comma-separated subset of experts")
    experts.add_argument("--resume", action="store_true", help=RESUME_HELP)
    experts.add_argument(
        "--concurrent",
        action="store_true",
        help="train all experts together in one pass over one copy of the base (one batch mixes them)",
    )
    device_opts(experts)
    router = train.add_parser("router", help="train the router adapter")
    router.add_argument("--dataset-path", required=True, help="preprocessed router dataset folder")
    router.add_argument("--config", required=True, help="router.yaml")
    router.add_argument("--resume", action="store_true", help=RESUME_HELP)
    device_opts(router)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    evr = ev.add_parser("router", help="accuracy, top-k, per-expert P/R/F1, confusion, calibration")
    evr.add_argument("--checkpoint", required=True, help="router checkpoint (or adapter) folder")
    evr.add_argument("--test-data", required=True, help="routing JSONL")
    evr.add_argument(
        "--split", default="test", help="records of this split when records carry one (default test)"
    )
    evr.add_argument("--output", default=None, help="report JSON (default CHECKPOINT/eval_report.json)")
    evr.add_argument("--batch-size", type=_at_least_one, default=8)
    evr.add_argument("--base-model", default=None, help="base to load instead of the one the router recorded")
    evr.add_argument(
        "--consistency",
        action="store_true",
        help="also measure routing consistency (alone vs batched, benign perturbations)",
    )
    device_opts(evr)

    tst = sub.add_parser(
        "test", help="quick checks before a deploy (exit 1 below the threshold)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    tr = tst.add_parser(
        "router", help="route a small held-out sample per expert; per-expert and overall accuracy"
    )
    tr.add_argument("--checkpoint", required=True, help="router checkpoint (or adapter) folder")
    tr.add_argument("--test-data", required=True, help="routing JSONL")
    from .eval.router_check import DEFAULT_PER_EXPERT  # light: no model library at import

    tr.add_argument(
        "--per-expert",
        type=_at_least_one,
        default=DEFAULT_PER_EXPERT,
        help=f"test records per expert, the same ones every time ({DEFAULT_PER_EXPERT})",
    )
    tr.add_argument(
        "--min-accuracy",
        type=_fraction,
        default=None,
        help="exit 1 when the overall accuracy is below this (0..1); without it, exit 0",
    )
    tr.add_argument(
        "--split", default="test", help="records of this split when records carry one (default test)"
    )
    tr.add_argument("--batch-size", type=_at_least_one, default=8)
    tr.add_argument("--base-model", default=None, help="base to load instead of the one the router recorded")
    device_opts(tr)

    dep = sub.add_parser(
        "deploy",
        help="upload router + experts + label map + checksummed manifest as a new release; manage releases",
        description="`mole deploy --checkpoint CKPT --experts DIR --bucket DEST` uploads a new release to "
        "DEST/releases/<id>/ and points DEST/CURRENT at it once it is read back intact. The actions below "
        "list, verify, promote, roll back and remove releases.",
    )
    dep.add_argument("--checkpoint", default=None, help="router checkpoint folder (required to deploy)")
    dep.add_argument(
        "--experts",
        default=None,
        help="folder holding <expert>/adapter for every expert (required to deploy)",
    )
    dep.add_argument(
        "--bucket", default=None, help="destination: a folder or URL (s3://, gs://, file://, memory://)"
    )
    _deploy_actions(dep)
    dep.add_argument(
        "--min-accuracy",
        type=_fraction,
        default=None,
        help="refuse (exit 1) a router whose recorded evaluation is below this: the `mole eval router` "
        "report of these weights (CHECKPOINT/eval_report.json or --eval-report), else router_info.json's "
        "validation accuracy; none recorded: refuse (exit 2)",
    )
    dep.add_argument(
        "--eval-report", default=None, help="the `mole eval router` report to check (written elsewhere)"
    )
    dep.add_argument("--force", action="store_true", help="deploy even below --min-accuracy")

    inf = sub.add_parser("infer", help="route each request, then generate with the chosen expert")
    inf.add_argument("--deployment", required=True)
    inf.add_argument("--image", default=None)
    inf.add_argument("--prompt", default=None)
    inf.add_argument(
        "--input",
        default=None,
        help="requests JSONL ({image, prompt} lines, or messages/ShareGPT records); image paths absolute "
        "or relative to the file",
    )
    inf.add_argument("--output", default=None, help="write results as JSONL here, each batch as it finishes")
    inf.add_argument("--expert", default=None, help="skip routing and use this expert")
    inf.add_argument("--batch-size", type=_at_least_one, default=8)
    inf.add_argument("--max-new-tokens", type=_at_least_one, default=None)
    inf.add_argument(
        "--min-probability",
        type=_fraction,
        default=None,
        help="below this routing probability the --fallback answers",
    )
    inf.add_argument("--fallback", default=None, help="expert name, or 'base' (the base model, no adapter)")
    inf.add_argument(
        "--base-model",
        default=None,
        help="base to load instead of the recorded one (a deployment moved to another machine)",
    )
    device_opts(inf)

    from .serve import defaults as sd

    srv = sub.add_parser(
        "serve", help="serve the routed stack over HTTP (OpenAI-compatible chat completions, batched)"
    )
    srv.add_argument("--deployment", default=None, help="deployment folder or fsspec URL (or in --config)")
    srv.add_argument("--config", default=None, help="serve settings file (YAML/JSON); options override it")
    srv.add_argument("--host", default=None, help=f"address to bind (default {sd.DEFAULT_HOST})")
    srv.add_argument("--port", type=_positive, default=None, help=f"port (default {sd.DEFAULT_PORT})")
    srv.add_argument(
        "--max-batch", type=_at_least_one, default=None, help=f"requests per engine batch ({sd.MAX_BATCH})"
    )
    srv.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help=f"how long a batch waits to fill up ({sd.MAX_WAIT_MS:g} ms)",
    )
    srv.add_argument("--allow-files", default=None, help="accept local image paths inside this folder only")
    srv.add_argument(
        "--max-image-pixels",
        type=_at_least_one,
        default=None,
        help=f"width x height per image ({sd.MAX_IMAGE_PIXELS})",
    )
    srv.add_argument(
        "--max-images", type=_at_least_one, default=None, help=f"images per request ({sd.MAX_IMAGES})"
    )
    srv.add_argument(
        "--max-body-bytes", type=_at_least_one, default=None, help=f"request body size ({sd.MAX_BODY_BYTES})"
    )
    srv.add_argument(
        "--max-tokens",
        type=_at_least_one,
        default=None,
        help=f"largest max_tokens accepted ({sd.MAX_TOKENS})",
    )
    srv.add_argument(
        "--min-probability",
        type=_fraction,
        default=None,
        help="below this routing probability the --fallback answers",
    )
    srv.add_argument("--fallback", default=None, help="an expert's name, or 'base' (no adapter)")
    srv.add_argument("--base-model", default=None, help="base to load instead of the recorded one")
    srv.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    srv.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")

    hist = sub.add_parser("history", help="run history").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    show = hist.add_parser("show", help="every run of every stage, newest first")
    show.add_argument("--stage", default=None)
    show.add_argument("--limit", type=_positive, default=None)
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.add_argument(
        "--run",
        default=None,
        metavar="ID",
        help="everything recorded about this run (an id or unique prefix)",
    )
    compare = hist.add_parser("compare", help="two runs side by side: fields, config changes, metric changes")
    compare.add_argument("runs", nargs=2, metavar="RUN", help="run ids (or unique prefixes)")
    compare.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    from .layout import HISTORY_REPORT_FILE

    report = hist.add_parser(
        "report", help="one self-contained HTML page: loss curves, router metrics, experts, runs and cost"
    )
    report.add_argument(
        "--output", default=None, help=f"HTML file to write (default WORKDIR/{HISTORY_REPORT_FILE})"
    )
    plot = hist.add_parser("plot", help="the report's figures as PNG files (of one run with --run)")
    plot.add_argument("--run", default=None, metavar="ID", help="only the figures of this run")
    plot.add_argument("--output-dir", required=True, help="folder for the PNG files")
    backfill = hist.add_parser(
        "backfill",
        help="import past runs below DIR (train_log.jsonl, *_info.json, eval reports, TensorBoard, "
        "trainer_state.json); a second import adds nothing",
    )
    backfill.add_argument("dir", metavar="DIR")
    return p


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    """Dispatch parsed arguments to the stage functions."""
    from . import stages

    wd = args.workdir or os.environ.get("MOLE_WORKDIR") or "."
    cmd = (args.command, getattr(args, "action", None))
    if cmd[0] == "demo":
        from .pipeline import run_demo

        run_demo(
            args.demo_workdir or args.workdir or os.environ.get("MOLE_WORKDIR") or "runs/demo",
            force=args.force,
        )
    elif cmd[0] == "init":
        from .configs import init_workdir

        for path in init_workdir(args.init_workdir, args.preset, args.force):
            print(f"wrote {path}")
    elif cmd == ("model", "tiny"):
        _print_json(stages.model_tiny(args.out, wd, args.seed, args.processor))
    elif cmd == ("data", "synth"):
        counts = {"train": args.train, "val": args.val, "test": args.test}
        _print_json(stages.data_synth(args.out, wd, args.experts, counts, args.seed, args.size))
    elif cmd == ("data", "routing"):
        from .data.report import print_routing_stats

        print_routing_stats(stages.data_routing(args.config, args.output, wd))
    elif cmd == ("data", "check"):
        from .data.check import DataCheckFailed
        from .data.report import print_check_report

        try:
            report = stages.data_check(args.dir, wd)
        except DataCheckFailed as exc:
            print_check_report(exc.report)
            raise
        print_check_report(report)
    elif cmd == ("data", "ocr-crops"):
        from .data.ocr import format_ocr_summary

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
    elif cmd == ("data", "preprocess"):
        from pathlib import Path

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
            progress=_progress_bar("preprocessing"),
        )
        _print_json(meta)
        _report_rejects(meta["records"], args.output)
    elif cmd == ("data", "convert"):
        result = stages.data_convert(args.input, args.output, args.to, wd, strict=args.strict)
        _print_json(result)
        _report_rejects(result["records"], args.output)
    elif cmd == ("train", "experts"):
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
            _print_json(
                {
                    n: {k: r[k] for k in ("adapter", "metric", "value", "base_value", "best_val_loss")}
                    for n, r in results.items()
                }
            )
    elif cmd == ("train", "router"):
        info = stages.train_router(
            args.dataset_path, args.config, wd, args.device, args.dtype, resume=args.resume
        )
        if env_rank() == 0:  # under torchrun, one summary (rank 0 wrote the adapter)
            _print_json({k: info[k] for k in ("adapter", "best", "best_step", "steps", "label_map")})
    elif cmd == ("eval", "router"):
        from .eval.report import format_router_report

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
    elif cmd == ("test", "router"):
        from .eval.router_check import format_router_test

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
    elif cmd[0] == "deploy" and args.deploy_action:
        return _deploy_action(args, stages, wd)
    elif cmd[0] == "deploy":
        from .eval.router_check import format_gate

        missing = [f"--{n}" for n in ("checkpoint", "experts", "bucket") if getattr(args, n) is None]
        if missing:
            raise UserError(
                f"deploy needs {', '.join(missing)} (or an action: list, promote, rollback, verify, gc)"
            )
        if args.eval_report and args.min_accuracy is None:
            raise UserError("--eval-report is read only with --min-accuracy")
        from .storage import unserialized_note

        if unserialized_note(args.bucket):
            print(unserialized_note(args.bucket), file=sys.stderr)
        manifest = stages.deploy(
            args.checkpoint, args.experts, args.bucket, wd, args.min_accuracy, args.force, args.eval_report
        )
        gate = manifest.get("router_gate")
        if gate:
            print(format_gate(gate))
        from .storage import redact

        print(
            f"deployed release {manifest['release']}: {len(manifest['files'])} files "
            f"({', '.join(manifest['experts'])}) to {redact(args.bucket)}; CURRENT names it"
        )
    elif cmd[0] == "infer":
        _infer(args, stages, wd)
    elif cmd[0] == "serve":
        _serve(args, stages, wd)
    elif cmd[0] == "history":
        return _history(args, stages, wd)
    return 0


def _history(args, stages, wd) -> int:
    from .history_view import read_history

    if args.action == "show" and args.run:
        from .history_view import format_run

        data = read_history(wd)
        run = data.run(args.run)
        if args.json:
            _print_json({**run, "series": data.series(run["run_id"])})
        else:
            print(format_run(run, data))
    elif args.action == "show":
        from .history import format_runs_table
        from .layout import HISTORY_DB

        # a run whose process is gone shows (and is stored) as interrupted
        runs = stages.history_show(wd, args.stage, args.limit)
        if args.json:
            _print_json(runs)
        else:
            print(format_runs_table(runs) if runs else f"no runs recorded in {os.path.join(wd, HISTORY_DB)}")
    elif args.action == "compare":
        from .history_view import compare_rows, format_compare

        data = read_history(wd)
        a, b = (data.run(r) for r in args.runs)
        if args.json:
            _print_json(
                [dict(zip(("field", "a", "b", "change"), row, strict=True)) for row in compare_rows(a, b)]
            )
        else:
            print(format_compare(a, b))
    elif args.action == "report":
        result = stages.history_report(wd, args.output)
        for name, why in result["missing"].items():
            print(f"figure {name}: {why}", file=sys.stderr)
        print(f"wrote {result['report']} ({result['runs']} runs, {len(result['figures'])} figures)")
    elif args.action == "plot":
        result = stages.history_plot(wd, args.output_dir, args.run)
        for name, why in result["missing"].items():
            print(f"figure {name}: {why}", file=sys.stderr)
        for path in result["files"]:
            print(f"wrote {path}")
    elif args.action == "backfill":
        result = stages.history_backfill(args.dir, wd)
        for problem in result["problems"]:
            print(f"skipped: {problem}", file=sys.stderr)
        print(
            f"{result['found']} runs found below {args.dir}: {result['added']} added, "
            f"{result['already_present']} already in the history, {result['attached_to_recorded']} were "
            f"recorded runs (their curves attached); {result['metric_rows_added']} metric rows added"
        )
    return 0


def _deploy_actions(dep) -> None:
    """`mole deploy ACTION URL ...`: the release commands beside the flags form that deploys."""
    from .releases import INCOMPLETE_GRACE_S

    acts = dep.add_subparsers(dest="deploy_action", metavar="ACTION", parser_class=_Parser)
    acts.required = False
    lst = acts.add_parser(
        "list", help="the releases at URL, oldest first; * marks CURRENT, - its predecessor"
    )
    lst.add_argument("url")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prom = acts.add_parser("promote", help="point CURRENT at RELEASE (verified first)")
    prom.add_argument("url")
    prom.add_argument("release")
    rb = acts.add_parser("rollback", help="point CURRENT back at the release it named before")
    rb.add_argument("url")
    ver = acts.add_parser("verify", help="re-hash a release (default: CURRENT's); exit 1 naming bad files")
    ver.add_argument("url")
    ver.add_argument("release", nargs="?", default=None)
    gcp = acts.add_parser("gc", help="remove old releases; never CURRENT or its predecessor")
    gcp.add_argument("url")
    gcp.add_argument("--keep", type=_positive, required=True, help="complete releases to keep, newest first")
    gcp.add_argument(
        "--grace",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="object stores: remove an incomplete release (an upload that may still be running) only "
        f"once older than this (default {INCOMPLETE_GRACE_S:g})",
    )


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def _deploy_action(args, stages, wd) -> int:
    from .storage import redact, unserialized_note

    url = redact(args.url)
    action = args.deploy_action
    note = unserialized_note(args.url)
    if note and action in ("promote", "rollback", "gc"):
        print(note, file=sys.stderr)
    if action == "list":
        listing = stages.deploy_list(args.url)
        if args.json:
            _print_json(listing)
            return 0
        if not listing["releases"]:
            print(f"{url}: no releases" + (" (a flat-layout deployment is there)" if listing["flat"] else ""))
        for row in listing["releases"]:
            mark = "*" if row["current"] else "-" if row["previous"] else " "
            if row["complete"]:
                tail = f"{row['created_at']}  {row['files']} files  {row['bytes']} bytes  {','.join(row['experts'])}"
            else:
                tail = "incomplete (no manifest: an upload that did not finish)"
            print(f"{mark} {row['release']}  {tail}")
    elif action == "verify":
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
    elif action == "promote":
        result = stages.deploy_promote(args.url, args.release, wd)
        print(f"{url}: CURRENT -> {result['release']} (was {result['replaced']})")
    elif action == "rollback":
        result = stages.deploy_rollback(args.url, wd)
        print(f"{url}: CURRENT -> {result['release']} (rolled back from {result['replaced']})")
    elif action == "gc":
        result = stages.deploy_gc(args.url, args.keep, wd, args.grace)
        print(
            f"{url}: removed {len(result['removed'])} release(s) {result['removed']}; kept {result['kept']}"
            + (
                f"; left incomplete (may be uploading): {result['left_incomplete']}"
                if result["left_incomplete"]
                else ""
            )
        )
    return 0


def _progress_bar(label: str):
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


def _report_rejects(records: dict, output) -> None:
    from .layout import REJECTS_FILE

    line = f"{records['input']} records: {records['accepted']} accepted, {records['rejected']} rejected"
    if records["rejected"]:
        line += f" (reasons in {os.path.join(output, REJECTS_FILE)})"
    print(line, file=sys.stderr)


def _infer(args, stages, wd) -> None:
    from .infer.stacked import request_sample, requests_from_jsonl

    if args.input and (args.image or args.prompt):
        raise UserError("give either --input FILE or --image with --prompt, not both")
    if args.input:
        samples = requests_from_jsonl(args.input)
    elif args.image and args.prompt is not None:
        samples = [request_sample(args.image, args.prompt)]
    else:
        raise UserError("infer needs --image IMG --prompt TEXT, or --input requests.jsonl")
    if args.output:  # fail before the model work, not after it
        from pathlib import Path

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)

    def show(r: dict) -> None:
        prob = "forced" if r["probability"] is None else f"p={r['probability']:.3f}"
        if r["fallback"] is not None:
            prob += f" fallback (routed {r['routed']})"
        print(f"{r['id']}\t{r['expert']}\t{prob}\t{r['output']!r}", flush=True)

    stages.infer(
        args.deployment,
        samples,
        wd,
        args.batch_size,
        args.expert,
        args.device,
        args.dtype,
        args.max_new_tokens,
        args.base_model,
        output=args.output,
        min_probability=args.min_probability,
        fallback=args.fallback,
        on_result=show,
    )


def _serve(args, stages, wd) -> None:
    from .serve.defaults import DEFAULT_HOST, DEFAULT_PORT
    from .serve.settings import SERVE_OPTIONS, serve_settings

    settings = serve_settings(args.config, **{k: getattr(args, k) for k in SERVE_OPTIONS})
    if not settings.deployment:
        raise UserError("serve needs --deployment URL (or a --config file naming one)")
    host = args.host or DEFAULT_HOST
    port = DEFAULT_PORT if args.port is None else args.port
    answered = stages.serve(settings, host, port, wd)
    print(
        f"stopped: {answered['requests']} requests answered ({answered['ok']} ok, "
        f"{answered['refused']} refused, {answered['failed']} failed)",
        file=sys.stderr,
    )


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


if __name__ == "__main__":
    sys.exit(main())
