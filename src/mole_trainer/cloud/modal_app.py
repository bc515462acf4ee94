"""The Modal app: one Modal function per stage of mole_trainer.stages, with Volumes for the artifacts.

Every function only maps paths onto the Volumes, calls the stage function and syncs the Volumes; the
stage logic is the local one. Three Volumes, split by lifecycle, are mounted side by side under /vol::

    mole-models       /vol/models       base models (tiny-qwen3-vl/) and the Hugging Face cache (hf/)
    mole-data         /vol/data         config/*.yaml, experts/<expert>/, routing/routing_data.jsonl, prep/router/
    mole-checkpoints  /vol/checkpoints  experts/<expert>/, router/, eval/, deploy/, history/ (run records:
                                        JSONL files, one per container; `mole history report` merges them)

Paths given to the functions are relative to their Volume. Paths inside the configs resolve against the
config's folder, so configs in /vol/data/config/ name the other Volumes with ../../, e.g.
`base_model: ../../models/tiny-qwen3-vl`, `output_dir: ../../checkpoints/experts`, `data: ../experts/ocr`.

With MOLE_MODAL_ROOT set, the Volumes are the folders MOLE_MODAL_ROOT/{models,data,checkpoints} and are
never reloaded or committed: that is how `f.local(...)` runs a function on this machine.

Recovery: a config or data error (UserError) is returned as {"ok": False, "stage", "error"} instead of
raised, because Modal 1.6 retries every exception a function raises (modal.Retries has no exception
filter) and a retry cannot fix a config; the `main` entrypoint exits 2 on such a result. Other failures
(pre-emption, crashes, a lock still held by a pre-empted attempt) are raised, and retried where the
stage has retries (training, by default: TRAIN_RETRIES); training resumes from its newest checkpoint,
which is committed to the Volume as soon as it is saved.

Exit codes: `modal run ...modal_app::STAGE` runs a function by itself, and Modal's CLI discards what
it returns, so a returned UserError ends with exit 0 there (the container log shows `error: ...`);
only raising would make it exit non-zero, and that is retried and printed with a traceback. Through
the entrypoint, `modal run -m mole_trainer.cloud.modal_app STAGE --option value ...` (the same options)
runs the function remotely and exits 2 with the message on a UserError, as the pipeline run does.

Resources: GPU type and count, timeout and retries of each stage are STAGE_DEFAULTS unless the
modal.yaml named by MOLE_MODAL_CONFIG overrides them, e.g. `stages: {train_router: {gpu: H200}}`. The
file is read when the app is defined, on the machine that runs `modal run` or `modal deploy` (set it
there each time); a container keeps the resources its function was created with.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tomllib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import modal

from mole_trainer import stages
from mole_trainer.config import NO_GPU, ModalConfig, StageResources, load_config
from mole_trainer.data.synth import DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE
from mole_trainer.errors import UserError
from mole_trainer.layout import CACHE_DIR_ENV, LOCK_SHARED_ENV
from mole_trainer.locking import LockHeld, set_publisher
from mole_trainer.train.checkpoint import set_saved_hook

APP_NAME = "mole-trainer"
PYTHON_VERSION = "3.11"
PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"

MODELS, DATA, CHECKPOINTS = "models", "data", "checkpoints"
VOLUME_NAMES = {MODELS: "mole-models", DATA: "mole-data", CHECKPOINTS: "mole-checkpoints"}
MOUNT_ROOT = PurePosixPath("/vol")
LOCAL_ROOT_ENV = "MOLE_MODAL_ROOT"
HF_HOME = str(MOUNT_ROOT / MODELS / "hf")
MOLE_CACHE = str(MOUNT_ROOT / DATA / "cache")

MODAL_CONFIG_ENV = "MOLE_MODAL_CONFIG"  # a modal.yaml with per-stage resources (module docstring)

TRAIN_GPU = "H100"
EVAL_GPU = "L40S"

MINUTE = 60
HOUR = 60 * MINUTE
DATA_TIMEOUT = 1 * HOUR
PREPROCESS_CPUS = 8  # preprocessing containers: one worker process per CPU
TRAIN_TIMEOUT = 6 * HOUR
EVAL_TIMEOUT = 2 * HOUR
FANOUT_TIMEOUT = 24 * HOUR  # Modal's maximum: waits for the slowest expert, retries included

# Only training retries (after a pre-emption or crash), resuming from its newest checkpoint on the Volume.
TRAIN_RETRIES = 2
RETRY_BACKOFF = 2.0
RETRY_DELAY_S = 30.0

# today's resources of every stage function (gpu, gpu_count, timeout_s, retries); modal.yaml overrides keys
_DATA = StageResources(NO_GPU, 1, DATA_TIMEOUT, 0)
_TRAIN = StageResources(TRAIN_GPU, 1, TRAIN_TIMEOUT, TRAIN_RETRIES)
_EVAL = StageResources(EVAL_GPU, 1, EVAL_TIMEOUT, 0)
STAGE_DEFAULTS = {
    "model_tiny": _DATA,
    "data_synth": _DATA,
    "data_routing": _DATA,
    "data_check": _DATA,
    "data_preprocess": _DATA,
    "train_experts": _TRAIN,
    "train_expert_fanout": StageResources(NO_GPU, 1, FANOUT_TIMEOUT, 0),
    "train_router": _TRAIN,
    "eval_router": _EVAL,
    "test_router": _EVAL,
    "deploy": _DATA,
}

# default locations, relative to their Volume (the layout in the module docstring)
TINY_MODEL = "tiny-qwen3-vl"
CONFIG_DIR = "config"
EXPERTS_DATA = "experts"
ROUTING_FILE = "routing/routing_data.jsonl"
ROUTER_PREP = "prep/router"
EXPERTS_CKPT = "experts"
ROUTER_CKPT = "router"
EVAL_REPORT = "eval/router_report.json"
DEPLOY_DIR = "deploy"
# `deploy(bucket=URL)` reads the bucket's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_ENDPOINT_URL, ... or GOOGLE_APPLICATION_CREDENTIALS) from the modal.Secret this variable names
# when the app is run or deployed; unset, no Secret is attached (Secret.from_name of a missing Secret
# would stop every function of the app from starting)
DEPLOY_SECRET_ENV = "MOLE_MODAL_DEPLOY_SECRET"


def pinned_dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    """The project's pinned dependencies, read from pyproject.toml (the one place they are written)."""
    if not pyproject.is_file():
        raise UserError(
            f"{pyproject}: not found; the Modal app is built from a source checkout of mole-trainer"
        )
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def stage_resources(path: str | Path | None) -> dict[str, StageResources]:
    """Every stage's resources: STAGE_DEFAULTS, with the keys a modal.yaml at `path` sets over them."""
    out = dict(STAGE_DEFAULTS)
    if not path:
        return out
    for name, given in load_config(path, ModalConfig).stages.items():
        if name not in out:
            raise UserError(f"{path}: unknown stage 'stages.{name}'; the Modal app has {', '.join(out)}")
        set_keys = {k: v for k, v in dataclasses.asdict(given).items() if v is not None}
        out[name] = dataclasses.replace(out[name], **set_keys)
    return out


def function_options(res: StageResources) -> dict:
    """The `app.function` arguments (gpu, timeout, retries) of a stage's resources."""
    gpu = None if res.gpu == NO_GPU else res.gpu if res.gpu_count == 1 else f"{res.gpu}:{res.gpu_count}"
    retries = None
    if res.retries:
        retries = modal.Retries(
            max_retries=res.retries, backoff_coefficient=RETRY_BACKOFF, initial_delay=RETRY_DELAY_S
        )
    return {"gpu": gpu, "timeout": res.timeout_s, "retries": retries}


# a container keeps the resources its function was created with: only the defining machine reads the file
RESOURCES = stage_resources(os.environ.get(MODAL_CONFIG_ENV) if modal.is_local() else None)
OPTIONS = {name: function_options(res) for name, res in RESOURCES.items()}


# the Python function of each stage function (its parameters are the stage's `modal run` options)
STAGE_CODE: dict[str, Callable] = {}


def user_errors_returned(fn):
    """Return a UserError (a config or data error) as {"ok": False, "stage", "error"} instead of raising it.

    Modal retries whatever a function raises, and a retry cannot fix a config. A LockHeld is raised
    still: the lock of a pre-empted attempt expires within its lease, so a later retry succeeds.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LockHeld:
            raise
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return {"ok": False, "stage": fn.__name__, "error": str(exc)}

    STAGE_CODE[fn.__name__] = fn
    return run


def failed(result) -> bool:
    """True for the result of a stage function that returned its UserError."""
    return isinstance(result, dict) and result.get("ok") is False


def checked(result):
    """`result`, or exit 2 with its error when the stage returned a UserError (for entrypoints)."""
    if failed(result):
        print(f"error: {result['stage']}: {result['error']}", file=sys.stderr)
        raise SystemExit(2)
    return result


def user_errors_exit(fn):
    """For local entrypoints: a UserError ends the run with its message and exit 2, without a traceback.

    (Modal prints the traceback of any Exception an entrypoint raises and exits 1; SystemExit passes.)
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


# Inside a container the module is imported again but the image is already built (and there is no
# pyproject.toml), so the package list is only read where the image is defined.
PIP_PACKAGES = pinned_dependencies() if modal.is_local() else []


def _git_env() -> dict[str, str]:
    """The commit the image is built from, for run records (the image holds the source without .git)."""
    from mole_trainer.runinfo import GIT_COMMIT_ENV, git_state

    commit, dirty = git_state()
    return {GIT_COMMIT_ENV: commit + ("-dirty" if dirty else "")} if commit else {}


GIT_ENV = _git_env() if modal.is_local() else {}

image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .pip_install(*PIP_PACKAGES)
    # images extracted from HF datasets live on the data Volume: later containers train on them
    .env({"HF_HOME": HF_HOME, CACHE_DIR_ENV: MOLE_CACHE})
    # containers may share host names and pids: judge every output lock by its lease
    .env({LOCK_SHARED_ENV: "1"})
    .env(GIT_ENV)
    # ignore=[]: ship the package data (configs/*.yaml) too, not only the .py files
    .add_local_python_source("mole_trainer", ignore=[])
)

VOLUMES = {kind: modal.Volume.from_name(name, create_if_missing=True) for kind, name in VOLUME_NAMES.items()}
MOUNTS = {str(MOUNT_ROOT / kind): volume for kind, volume in VOLUMES.items()}

app = modal.App(APP_NAME, image=image)


def volume_root(kind: str) -> Path:
    """Where Volume `kind` is: MOLE_MODAL_ROOT/<kind> when that is set (local runs), else its mount point."""
    local = os.environ.get(LOCAL_ROOT_ENV)
    return Path(local) / kind if local else Path(MOUNT_ROOT / kind)


def volume_path(kind: str, relative: str) -> Path:
    """Resolve a caller's path inside Volume `kind`; absolute paths and '..' escapes are user errors."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"{relative!r}: expected a path relative to the {kind} volume, without '..'")
    return volume_root(kind) / path


@contextmanager
def synced(reads: tuple[str, ...] = (), writes: tuple[str, ...] = ()):
    """Reload the Volumes a stage reads or writes before it runs; commit the ones it wrote once it succeeded.

    Written Volumes are reloaded too: a warm container must see files (output locks, the history's
    runs) that other containers changed before it acts on them. Nothing happens under MOLE_MODAL_ROOT (no Volumes).
    """
    mounted = LOCAL_ROOT_ENV not in os.environ
    if mounted:
        for kind in dict.fromkeys(reads + writes):
            VOLUMES[kind].reload()
        set_publisher(_commit_lock)
        set_saved_hook(_commit_checkpoint)  # a retry resumes from the newest checkpoint the Volume has
    try:
        yield
    finally:
        set_saved_hook(None)
    if mounted:
        for kind in writes:
            VOLUMES[kind].commit()


def _commit_lock(path: Path) -> None:
    """Commit the Volume holding an output lock just written, renewed or removed, or a checkpoint just
    saved: other containers (a retry) see a Volume's files only once committed (and after their own
    reload, done when a stage starts)."""
    for kind, volume in VOLUMES.items():
        if Path(path).is_relative_to(MOUNT_ROOT / kind):
            volume.commit()


def _commit_checkpoint(folder: Path) -> None:
    """Commit the Volume holding a checkpoint just saved; a failed commit is reported, not fatal.

    (Modal reloads the Volume after a commit, which refuses while files are open on it, such as the
    TensorBoard events being written; the background commits and the next save's commit still come.)
    """
    try:
        _commit_lock(folder)
    except Exception as exc:
        print(f"warning: {folder}: Volume commit failed ({type(exc).__name__}: {exc})", file=sys.stderr)


def _names(csv: str) -> list[str] | None:
    """The names of a comma-separated list (`modal run` passes only scalars); None for an empty one."""
    return [n.strip() for n in csv.split(",") if n.strip()] or None


def _workdir(workdir: str) -> Path:
    return volume_path(CHECKPOINTS, workdir)


def _model_ref(model: str) -> str:
    """A model folder on the models Volume, or a hub id (downloaded into HF_HOME there) when no such folder."""
    from mole_trainer.config import looks_like_hub_id

    path = volume_path(MODELS, model)
    return model if not path.exists() and looks_like_hub_id(model) else str(path)


@app.function(volumes=MOUNTS, **OPTIONS["model_tiny"])
@user_errors_returned
def model_tiny(out: str = TINY_MODEL, seed: int = 0, workdir: str = ".", processor: str = "") -> dict:
    """Build the tiny offline Qwen3-VL into the models Volume (around a processor folder there, if given)."""
    with synced(writes=(MODELS, CHECKPOINTS)):
        proc = volume_path(MODELS, processor) if processor else None
        return stages.model_tiny(volume_path(MODELS, out), _workdir(workdir), seed, proc)


@app.function(volumes=MOUNTS, **OPTIONS["data_synth"])
@user_errors_returned
def data_synth(
    out: str = EXPERTS_DATA,
    experts: str = "",
    train: int = DEFAULT_COUNTS["train"],
    val: int = DEFAULT_COUNTS["val"],
    test: int = DEFAULT_COUNTS["test"],
    seed: int = 0,
    width: int = DEFAULT_IMAGE_SIZE[0],
    height: int = DEFAULT_IMAGE_SIZE[1],
    workdir: str = ".",
) -> dict:
    """Write the synthetic expert datasets (`experts`: comma-separated, default all) into the data Volume."""
    counts = {"train": train, "val": val, "test": test}
    with synced(writes=(DATA, CHECKPOINTS)):
        return stages.data_synth(
            volume_path(DATA, out), _workdir(workdir), _names(experts), counts, seed, (width, height)
        )


@app.function(volumes=MOUNTS, **OPTIONS["data_routing"])
@user_errors_returned
def data_routing(
    config: str = f"{CONFIG_DIR}/dataset.yaml", output: str = ROUTING_FILE, workdir: str = "."
) -> dict:
    """Build the routing dataset of a dataset.yaml on the data Volume."""
    with synced(writes=(DATA, CHECKPOINTS)):
        return stages.data_routing(volume_path(DATA, config), volume_path(DATA, output), _workdir(workdir))


@app.function(volumes=MOUNTS, **OPTIONS["data_check"])
@user_errors_returned
def data_check(path: str = ROUTING_FILE, workdir: str = ".") -> dict:
    """Check a routing dataset on the data Volume: no image in two splits, labels in the map, images decode."""
    with synced(reads=(DATA,), writes=(CHECKPOINTS,)):
        return stages.data_check(volume_path(DATA, path), _workdir(workdir))


@app.function(volumes=MOUNTS, cpu=PREPROCESS_CPUS, **OPTIONS["data_preprocess"])
@user_errors_returned
def data_preprocess(
    input: str = ROUTING_FILE,
    output: str = ROUTER_PREP,
    model: str = TINY_MODEL,
    task: str = "router",
    label_map: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    workdir: str = ".",
    workers: int = PREPROCESS_CPUS,
    strict: bool = False,
) -> dict:
    """Preprocess an expert dataset folder or a routing JSONL (data Volume) with a models-Volume processor.

    Bad records are listed in the output's rejects file, as with `mole data preprocess` (`strict`
    fails on the first one instead).
    """
    with synced(writes=(MODELS, DATA, CHECKPOINTS)):
        return stages.data_preprocess(
            volume_path(DATA, input),
            volume_path(DATA, output),
            _model_ref(model),
            task,
            volume_path(DATA, label_map) if label_map else None,
            min_pixels,
            max_pixels,
            _workdir(workdir),
            workers=workers,
            strict=strict,
        )


@app.function(volumes=MOUNTS, **OPTIONS["train_experts"])
@user_errors_returned
def train_experts(
    config: str = f"{CONFIG_DIR}/loras.yaml", only: str = "", workdir: str = ".", resume: bool = True
) -> dict:
    """Train the expert LoRAs of a loras.yaml on the data Volume (all, or the comma-separated `only`).

    Resumes by default, so a retry after a pre-emption continues from the newest checkpoint on the
    Volume (one made with other settings or data is refused; pass resume=False to start over).
    """
    with synced(reads=(DATA,), writes=(MODELS, CHECKPOINTS)):
        return stages.train_experts(volume_path(DATA, config), _workdir(workdir), _names(only), resume=resume)


@app.function(volumes=MOUNTS, **OPTIONS["train_expert_fanout"])
@user_errors_returned
def train_expert_fanout(config: str = f"{CONFIG_DIR}/loras.yaml", experts: str = "") -> dict:
    """Train every expert of loras.yaml (or the comma-separated `experts`) in a container of its own.

    Returns {expert: result} like train_experts, or the UserErrors of the experts that returned one.
    """
    from mole_trainer.config import LorasConfig, load_config

    with synced(reads=(DATA,)):
        names = _names(experts) or list(load_config(volume_path(DATA, config), LorasConfig).experts)
    if not names:
        raise UserError(f"{config}: the config lists no experts")
    # one history for all: under MOLE_LOCK_SHARED each container writes JSONL files of its own there
    # (history_files.py); of concurrent commits to one file a Volume would keep only the last
    calls = [(config, name, ".") for name in names]
    results, errors = {}, []
    for (_, name, _), result in zip(calls, train_experts.starmap(calls), strict=True):
        if failed(result):
            errors.append(f"{name}: {result['error']}")
        else:
            results.update(result)
    if errors:
        raise UserError("; ".join(errors))
    return results


@app.function(volumes=MOUNTS, **OPTIONS["train_router"])
@user_errors_returned
def train_router(
    dataset_path: str = ROUTER_PREP,
    config: str = f"{CONFIG_DIR}/router.yaml",
    workdir: str = ".",
    resume: bool = True,
) -> dict:
    """Train the router adapter on a preprocessed router dataset (both on the data Volume).

    Resumes by default from the newest checkpoint on the Volume, so a retry loses at most `save_every`
    steps (resume=False starts over).
    """
    with synced(reads=(DATA,), writes=(MODELS, CHECKPOINTS)):
        return stages.train_router(
            volume_path(DATA, dataset_path), volume_path(DATA, config), _workdir(workdir), resume=resume
        )


@app.function(volumes=MOUNTS, **OPTIONS["eval_router"])
@user_errors_returned
def eval_router(
    checkpoint: str = ROUTER_CKPT,
    test_data: str = ROUTING_FILE,
    output: str | None = EVAL_REPORT,
    split: str | None = "test",
    batch_size: int = 8,
    workdir: str = ".",
) -> dict:
    """Evaluate a router checkpoint (checkpoints Volume) on routing records (data Volume); writes the report."""
    with synced(reads=(DATA,), writes=(MODELS, CHECKPOINTS)):
        return stages.eval_router(
            volume_path(CHECKPOINTS, checkpoint),
            volume_path(DATA, test_data),
            volume_path(CHECKPOINTS, output) if output else None,
            split,
            _workdir(workdir),
            batch_size,
        )


@app.function(volumes=MOUNTS, **OPTIONS["test_router"])
@user_errors_returned
def test_router(
    checkpoint: str = ROUTER_CKPT,
    test_data: str = ROUTING_FILE,
    per_expert: int | None = None,
    min_accuracy: float | None = None,
    split: str | None = "test",
    batch_size: int = 8,
    workdir: str = ".",
) -> dict:
    """Route a small held-out sample per expert (`mole test router`); `passed` is False below min_accuracy."""
    with synced(reads=(DATA,), writes=(MODELS, CHECKPOINTS)):
        return stages.test_router(
            volume_path(CHECKPOINTS, checkpoint),
            volume_path(DATA, test_data),
            per_expert,
            min_accuracy,
            split,
            _workdir(workdir),
            batch_size,
        )


def deploy_secrets() -> list:
    """The modal.Secret named by $MOLE_MODAL_DEPLOY_SECRET (bucket credentials for deploy), if set."""
    name = os.environ.get(DEPLOY_SECRET_ENV, "").strip()
    return [modal.Secret.from_name(name)] if name else []


@app.function(volumes=MOUNTS, secrets=deploy_secrets(), **OPTIONS["deploy"])
@user_errors_returned
def deploy(
    checkpoint: str = ROUTER_CKPT,
    experts_dir: str = EXPERTS_CKPT,
    dest: str = DEPLOY_DIR,
    workdir: str = ".",
    min_accuracy: float | None = None,
    force: bool = False,
    eval_report: str | None = EVAL_REPORT,
    bucket: str = "",
) -> dict:
    """Deploy the router and its experts (checkpoints Volume) as a new release into `dest` on the
    checkpoints Volume, or into `bucket` (a URL: s3://, gs://, ...; credentials from the Secret
    named by $MOLE_MODAL_DEPLOY_SECRET) when given.

    With `min_accuracy`, the router's `eval_report` (checkpoints Volume; eval_router writes it there)
    must reach it, unless `force`; eval_report=None uses the report beside the checkpoint, else the
    validation accuracy of router_info.json.
    """
    if bucket and "://" not in bucket:
        raise UserError(f"bucket {bucket!r}: expected a URL such as s3://BUCKET/PREFIX (or use dest)")
    with synced(writes=(CHECKPOINTS,)):
        report = volume_path(CHECKPOINTS, eval_report) if eval_report and min_accuracy is not None else None
        return stages.deploy(
            volume_path(CHECKPOINTS, checkpoint),
            volume_path(CHECKPOINTS, experts_dir),
            bucket or str(volume_path(CHECKPOINTS, dest)),
            _workdir(workdir),
            min_accuracy,
            force,
            report,
        )


# The web endpoint's settings (serve.settings.ServeConfig): read from the serve config file named by
# MOLE_SERVE_CONFIG when the app is deployed (GPU type, concurrency and replica range go into the
# function's definition), and handed to the containers in the image's environment as JSON, so a
# container serves exactly what was deployed.
SERVE_CONFIG_ENV = "MOLE_SERVE_CONFIG"
SERVE_SETTINGS_ENV = "MOLE_SERVE_SETTINGS"
SERVE_TIMEOUT = 10 * MINUTE  # the longest one request may take
SERVE_SCALEDOWN_S = 5 * MINUTE  # an idle replica stays warm this long (loading the stack takes a while)


def serve_config():
    """The endpoint's ServeConfig: the deployed one inside a container, else MOLE_SERVE_CONFIG or the defaults.

    `deployment` (default: the deploy stage's DEPLOY_DIR), `base_model` and `allow_files` are relative to
    the checkpoints, models and data Volumes.
    """
    from mole_trainer.config import from_dict
    from mole_trainer.serve.settings import ServeConfig, serve_settings

    deployed = os.environ.get(SERVE_SETTINGS_ENV)
    if deployed:
        return from_dict(ServeConfig, json.loads(deployed), SERVE_SETTINGS_ENV)
    return serve_settings(os.environ.get(SERVE_CONFIG_ENV) or None, resolve=False)


def serve_function_options(settings) -> dict:
    """The Modal function options of the endpoint that come from its settings."""
    return {
        "gpu": settings.gpu,
        "min_containers": settings.min_containers,
        "max_containers": settings.max_containers,
    }


SERVE = serve_config()
serve_image = image.env({SERVE_SETTINGS_ENV: json.dumps(dataclasses.asdict(SERVE))})


@app.function(
    image=serve_image,
    volumes=MOUNTS,
    timeout=SERVE_TIMEOUT,
    scaledown_window=SERVE_SCALEDOWN_S,
    **serve_function_options(SERVE),
)
@modal.concurrent(max_inputs=SERVE.concurrency)
@modal.asgi_app()
def web():
    """The `mole serve` app (OpenAI-compatible, micro-batched) over a deployment on the checkpoints Volume.

    Each replica loads the deployment once and batches the requests it takes (up to the config's
    `concurrency` at once); Modal adds replicas, up to `max_containers`, as the load grows.
    """
    with synced(reads=(MODELS, CHECKPOINTS)):
        settings = dataclasses.replace(
            SERVE,
            deployment=str(volume_path(CHECKPOINTS, SERVE.deployment or DEPLOY_DIR)),
            base_model=_model_ref(SERVE.base_model) if SERVE.base_model else None,
            allow_files=str(volume_path(DATA, SERVE.allow_files)) if SERVE.allow_files else None,
        )
        return stages.serve_app(settings)


# every stage function by name, for the entrypoint
STAGES = {name: globals()[name] for name in STAGE_DEFAULTS}
ENTRYPOINT = "modal run -m mole_trainer.cloud.modal_app"


def stage_call(args: tuple[str, ...] | list[str]) -> tuple[str, dict]:
    """(stage, keyword arguments) of `STAGE --option value ...`, with the options `modal run ::STAGE` takes.

    A bad option ends the run with argparse's usage message and exit 2.
    """
    from mole_trainer.cloud.entrypoint_args import options_parser

    name = args[0] if args else ""
    if name not in STAGES:
        raise UserError(f"{name!r}: unknown stage; expected one of {', '.join(STAGES)} (or --config-dir DIR)")
    return name, vars(options_parser(STAGE_CODE[name], f"{ENTRYPOINT} {name}").parse_args(args[1:]))


@app.local_entrypoint()
@user_errors_exit
def main(*args: str):
    """`--config-dir DIR`: upload DIR/{dataset,loras,router}.yaml to the data Volume, then run the demo
    pipeline on Modal. `STAGE --option value ...`: run one stage function (options as for ::STAGE) and
    print its result. Either exits 2 with the message on a config or data error. Help: `-h` (Modal's
    own command line answers `--help` before this function sees it)."""
    if args and not args[0].startswith("-"):
        name, kwargs = stage_call(args)
        print(json.dumps(checked(STAGES[name].remote(**kwargs)), indent=2, default=str))
        return
    parser = argparse.ArgumentParser(
        prog=ENTRYPOINT,
        usage=f"{ENTRYPOINT} --config-dir DIR | {ENTRYPOINT} STAGE [--option value ...]",
        description=f"Run the demo pipeline on Modal, or one stage ({', '.join(STAGES)}; `STAGE -h` "
        "lists its options).",
    )
    parser.add_argument(
        "--config-dir", required=True, help="folder with dataset.yaml, loras.yaml, router.yaml"
    )
    run_pipeline(Path(parser.parse_args(args).config_dir))


def run_pipeline(config_dir: Path) -> None:
    """Check and upload the configs of `config_dir`, then run every stage in order; exit 2 on a user error."""
    from mole_trainer.config import DatasetConfig, LorasConfig, RouterConfig
    from mole_trainer.configs import CONFIG_FILES
    from mole_trainer.pipeline import DEMO_SEED, DEMO_SYNTH_COUNTS

    # all three checked here first: a broken file stops the run before anything is uploaded or started
    kinds = {"dataset.yaml": DatasetConfig, "loras.yaml": LorasConfig, "router.yaml": RouterConfig}
    configs = {name: load_config(config_dir / name, kinds[name]) for name in CONFIG_FILES}
    with VOLUMES[DATA].batch_upload(force=True) as batch:
        for name in CONFIG_FILES:
            batch.put_file(config_dir / name, f"/{CONFIG_DIR}/{name}")
    pixels = configs["router.yaml"].image
    checked(model_tiny.remote(TINY_MODEL, DEMO_SEED))
    checked(data_synth.remote(EXPERTS_DATA, seed=DEMO_SEED, **DEMO_SYNTH_COUNTS))
    checked(data_routing.remote())
    checked(data_preprocess.remote(min_pixels=pixels.min_pixels, max_pixels=pixels.max_pixels))
    experts = checked(train_expert_fanout.remote())
    router = checked(train_router.remote())
    report = checked(eval_router.remote())
    manifest = checked(deploy.remote())
    for name, e in experts.items():
        print(f"expert {name}: {e['metric']} {e['base_value']} (base) -> {e['value']}")
    print(f"router: best val accuracy {router['best']['val_accuracy']}, test accuracy {report['accuracy']}")
    print(
        f"deployed release {manifest['release']} ({len(manifest['files'])} files) to "
        f"{VOLUME_NAMES[CHECKPOINTS]}:/{DEPLOY_DIR}"
    )
