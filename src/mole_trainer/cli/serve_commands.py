"""`mole infer` and `mole serve`: routed generation from a deployment, one-off or over HTTP."""

from __future__ import annotations

import sys

from ..errors import UserError
from .common import at_least_one, device_options, fraction, non_negative
from .registry import Command

MIN_PROBABILITY_HELP = "below this routing probability the --fallback answers"


def _infer_arguments(parser) -> None:
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--image", default=None)
    parser.add_argument("--prompt", default=None)
    parser.add_argument(
        "--input",
        default=None,
        help="requests JSONL ({image, prompt} lines, or messages/ShareGPT records); image paths absolute "
        "or relative to the file",
    )
    parser.add_argument(
        "--output", default=None, help="write results as JSONL here, each batch as it finishes"
    )
    parser.add_argument("--expert", default=None, help="skip routing and use this expert")
    parser.add_argument("--batch-size", type=at_least_one, default=8)
    parser.add_argument("--max-new-tokens", type=at_least_one, default=None)
    parser.add_argument("--min-probability", type=fraction, default=None, help=MIN_PROBABILITY_HELP)
    parser.add_argument(
        "--fallback", default=None, help="expert name, or 'base' (the base model, no adapter)"
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="base to load instead of the recorded one (a deployment moved to another machine)",
    )
    device_options(parser)


def _show_result(r: dict) -> None:
    prob = "forced" if r["probability"] is None else f"p={r['probability']:.3f}"
    if r["fallback"] is not None:
        prob += f" fallback (routed {r['routed']})"
    print(f"{r['id']}\t{r['expert']}\t{prob}\t{r['output']!r}", flush=True)


def _infer(args, wd) -> None:
    from .. import stages
    from ..infer.stacked import request_sample, requests_from_jsonl

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
        on_result=_show_result,
    )


def _serve_arguments(parser) -> None:
    from ..serve import defaults as sd

    parser.add_argument("--deployment", default=None, help="deployment folder or fsspec URL (or in --config)")
    parser.add_argument("--config", default=None, help="serve settings file (YAML/JSON); options override it")
    parser.add_argument("--host", default=None, help=f"address to bind (default {sd.DEFAULT_HOST})")
    parser.add_argument("--port", type=non_negative, default=None, help=f"port (default {sd.DEFAULT_PORT})")
    parser.add_argument(
        "--max-batch", type=at_least_one, default=None, help=f"requests per engine batch ({sd.MAX_BATCH})"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help=f"how long a batch waits to fill up ({sd.MAX_WAIT_MS:g} ms)",
    )
    parser.add_argument(
        "--allow-files", default=None, help="accept local image paths inside this folder only"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=at_least_one,
        default=None,
        help=f"width x height per image ({sd.MAX_IMAGE_PIXELS})",
    )
    parser.add_argument(
        "--max-images", type=at_least_one, default=None, help=f"images per request ({sd.MAX_IMAGES})"
    )
    parser.add_argument(
        "--max-body-bytes", type=at_least_one, default=None, help=f"request body size ({sd.MAX_BODY_BYTES})"
    )
    parser.add_argument(
        "--max-tokens",
        type=at_least_one,
        default=None,
        help=f"largest max_tokens accepted ({sd.MAX_TOKENS})",
    )
    parser.add_argument("--min-probability", type=fraction, default=None, help=MIN_PROBABILITY_HELP)
    parser.add_argument("--fallback", default=None, help="an expert's name, or 'base' (no adapter)")
    parser.add_argument("--base-model", default=None, help="base to load instead of the recorded one")
    # no defaults here: a --config file's values count unless an option is given
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")


def _serve(args, wd) -> None:
    from .. import stages
    from ..serve.defaults import DEFAULT_HOST, DEFAULT_PORT
    from ..serve.settings import SERVE_OPTIONS, serve_settings

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


INFER = Command("infer", "route each request, then generate with the chosen expert", _infer_arguments, _infer)
SERVE = Command(
    "serve",
    "serve the routed stack over HTTP (OpenAI-compatible chat completions, batched)",
    _serve_arguments,
    _serve,
)
