"""The Modal app: one Modal function per stage of mole_trainer.stages, with Volumes for the artifacts.

Every function only maps paths onto the Volumes, calls the stage function and syncs the Volumes; the
stage logic is the local one. Three Volumes, split by lifecycle, are mounted side by side under /vol::

    mole-models       /vol/models       base models (tiny-qwen3-vl/) and the Hugging Face cache (hf/)
    mole-data         /vol/data         config/*.yaml, experts/<expert>/, routing/routing_data.jsonl, prep/router/
    mole-checkpoints  /vol/checkpoints  experts/<expert>/, router/, eval/, deploy/, history.sqlite,
                                        fanout/<expert>/history.sqlite (one per fan-out container)

Paths given to the functions are relative to their Volume. Paths inside the configs resolve against the
config's folder, so configs in /vol/data/config/ name the other Volumes with ../../, e.g.
`base_model: ../../models/tiny-qwen3-vl`, `output_dir: ../../checkpoints/experts`, `data: ../experts/ocr`.

With MOLE_MODAL_ROOT set, the Volumes are the folders MOLE_MODAL_ROOT/{models,data,checkpoints} and are
never reloaded or committed: that is how `f.local(...)` runs a function on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import modal

from mole_trainer import stages
from mole_trainer.data.synth import DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE
from mole_trainer.errors import UserError
from mole_trainer.layout import CACHE_DIR_ENV, LOCK_SHARED_ENV
from mole_trainer.locking import set_publisher

APP_NAME = "mole-trainer"
PYTHON_VERSION = "3.11"
PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"

MODELS, DATA, CHECKPOINTS = "models", "data", "checkpoints"
VOLUME_NAMES = {MODELS: "mole-models", DATA: "mole-data", CHECKPOINTS: "mole-checkpoints"}
MOUNT_ROOT = PurePosixPath("/vol")
LOCAL_ROOT_ENV = "MOLE_MODAL_ROOT"
HF_HOME = str(MOUNT_ROOT / MODELS / "hf")
MOLE_CACHE = str(MOUNT_ROOT / DATA / "cache")

TRAIN_GPU = "H100"
EVAL_GPU = "L40S"

MINUTE = 60
HOUR = 60 * MINUTE
DATA_TIMEOUT = 1 * HOUR
PREPROCESS_CPUS = 8  # preprocessing containers: one worker process per CPU
TRAIN_TIMEOUT = 6 * HOUR
EVAL_TIMEOUT = 2 * HOUR
FANOUT_TIMEOUT = 24 * HOUR  # Modal's maximum: waits for the slowest expert, retries included

# A retry re-runs the whole stage from the start; resuming from the last checkpoint on the Volume is a
# later issue. Modal retries every failure, a UserError (bad config) included.
TRAIN_RETRIES = modal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=30.0)

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
FANOUT_WORKDIR = "fanout"


def pinned_dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    """The project's pinned dependencies, read from pyproject.toml (the one place they are written)."""
    if not pyproject.is_file():
        raise UserError(
            f"{pyproject}: not found; the Modal app is built from a source checkout of mole-trainer"
        )
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


# Inside a container the module is imported again but the image is already built (and there is no
# pyproject.toml), so the package list is only read where the image is defined.
PIP_PACKAGES = pinned_dependencies() if modal.is_local() else []

image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .pip_install(*PIP_PACKAGES)
    # images extracted from HF datasets live on the data Volume: later containers train on them
    .env({"HF_HOME": HF_HOME, CACHE_DIR_ENV: MOLE_CACHE})
    # containers may share host names and pids: judge every output lock by its lease
    .env({LOCK_SHARED_ENV: "1"})
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

    Written Volumes are reloaded too: a warm container must see files (history.sqlite) that other
    containers changed before it rewrites them. Nothing happens under MOLE_MODAL_ROOT (no Volumes).
    """
    mounted = LOCAL_ROOT_ENV not in os.environ
    if mounted:
        for kind in dict.fromkeys(reads + writes):
            VOLUMES[kind].reload()
        set_publisher(_commit_lock)
    yield
    if mounted:
        for kind in writes:
            VOLUMES[kind].commit()


def _commit_lock(path: Path) -> None:
    """Commit the Volume holding an output lock just written, renewed or removed: other containers see
    a Volume's files only once committed (and after their own reload, done when a stage starts)."""
    for kind, volume in VOLUMES.items():
        if Path(path).is_relative_to(MOUNT_ROOT / kind):
            volume.commit()


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


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT)
def model_tiny(out: str = TINY_MODEL, seed: int = 0, workdir: str = ".", processor: str = "") -> dict:
    """Build the tiny offline Qwen3-VL into the models Volume (around a processor folder there, if given)."""
    with synced(writes=(MODELS, CHECKPOINTS)):
        proc = volume_path(MODELS, processor) if processor else None
        return stages.model_tiny(volume_path(MODELS, out), _workdir(workdir), seed, proc)


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT)
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


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT)
def data_routing(
    config: str = f"{CONFIG_DIR}/dataset.yaml", output: str = ROUTING_FILE, workdir: str = "."
) -> dict:
    """Build the routing dataset of a dataset.yaml on the data Volume."""
    with synced(writes=(DATA, CHECKPOINTS)):
        return stages.data_routing(volume_path(DATA, config), volume_path(DATA, output), _workdir(workdir))


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT)
def data_check(path: str = ROUTING_FILE, workdir: str = ".") -> dict:
    """Check a routing dataset on the data Volume: no image in two splits, labels in the map, images decode."""
    with synced(reads=(DATA,), writes=(CHECKPOINTS,)):
        return stages.data_check(volume_path(DATA, path), _workdir(workdir))


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT, cpu=PREPROCESS_CPUS)
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


@app.function(volumes=MOUNTS, gpu=TRAIN_GPU, timeout=TRAIN_TIMEOUT, retries=TRAIN_RETRIES)
def train_experts(
    config: str = f"{CONFIG_DIR}/loras.yaml", only: str = "", workdir: str = ".", resume: bool = True
) -> dict:
    """Train the expert LoRAs of a loras.yaml on the data Volume (all, or the comma-separated `only`).

    Resumes by default, so a retry after a pre-emption continues from the newest checkpoint on the
    Volume (one made with other settings or data is refused; pass resume=False to start over).
    """
    with synced(reads=(DATA,), writes=(MODELS, CHECKPOINTS)):
        return stages.train_experts(volume_path(DATA, config), _workdir(workdir), _names(only), resume=resume)


@app.function(volumes=MOUNTS, timeout=FANOUT_TIMEOUT)
def train_expert_fanout(config: str = f"{CONFIG_DIR}/loras.yaml", experts: str = "") -> dict:
    """Train every expert of loras.yaml (or the comma-separated `experts`) in a container of its own.

    Returns {expert: result} like train_experts.
    """
    from mole_trainer.config import LorasConfig, load_config

    with synced(reads=(DATA,)):
        names = _names(experts) or list(load_config(volume_path(DATA, config), LorasConfig).experts)
    if not names:
        raise UserError(f"{config}: the config lists no experts")
    # a history database per container: of concurrent commits to one file, a Volume keeps only the last
    calls = [(config, name, f"{FANOUT_WORKDIR}/{name}") for name in names]
    results = {}
    for result in train_experts.starmap(calls):
        results.update(result)
    return results


@app.function(volumes=MOUNTS, gpu=TRAIN_GPU, timeout=TRAIN_TIMEOUT, retries=TRAIN_RETRIES)
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


@app.function(volumes=MOUNTS, gpu=EVAL_GPU, timeout=EVAL_TIMEOUT)
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


@app.function(volumes=MOUNTS, gpu=EVAL_GPU, timeout=EVAL_TIMEOUT)
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


@app.function(volumes=MOUNTS, timeout=DATA_TIMEOUT)
def deploy(
    checkpoint: str = ROUTER_CKPT,
    experts_dir: str = EXPERTS_CKPT,
    dest: str = DEPLOY_DIR,
    workdir: str = ".",
    min_accuracy: float | None = None,
    force: bool = False,
    eval_report: str | None = EVAL_REPORT,
) -> dict:
    """Deploy the router and its experts (checkpoints Volume) into `dest` on the checkpoints Volume.

    With `min_accuracy`, the router's `eval_report` (checkpoints Volume; eval_router writes it there)
    must reach it, unless `force`; eval_report=None uses the report beside the checkpoint, else the
    validation accuracy of router_info.json.
    """
    with synced(writes=(CHECKPOINTS,)):
        report = volume_path(CHECKPOINTS, eval_report) if eval_report and min_accuracy is not None else None
        return stages.deploy(
            volume_path(CHECKPOINTS, checkpoint),
            volume_path(CHECKPOINTS, experts_dir),
            str(volume_path(CHECKPOINTS, dest)),
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


@app.local_entrypoint()
def main(config_dir: str):
    """Upload CONFIG_DIR/{dataset,loras,router}.yaml to the data Volume, then run the demo pipeline on Modal."""
    from mole_trainer.config import RouterConfig, load_config
    from mole_trainer.configs import CONFIG_FILES
    from mole_trainer.pipeline import DEMO_SEED, DEMO_SYNTH_COUNTS

    with VOLUMES[DATA].batch_upload(force=True) as batch:
        for name in CONFIG_FILES:
            batch.put_file(Path(config_dir) / name, f"/{CONFIG_DIR}/{name}")
    pixels = load_config(Path(config_dir) / "router.yaml", RouterConfig).image
    model_tiny.remote(TINY_MODEL, DEMO_SEED)
    data_synth.remote(EXPERTS_DATA, seed=DEMO_SEED, **DEMO_SYNTH_COUNTS)
    data_routing.remote()
    data_preprocess.remote(min_pixels=pixels.min_pixels, max_pixels=pixels.max_pixels)
    experts = train_expert_fanout.remote()
    router = train_router.remote()
    report = eval_router.remote()
    manifest = deploy.remote()
    for name, e in experts.items():
        print(f"expert {name}: {e['metric']} {e['base_value']} (base) -> {e['value']}")
    print(f"router: best val accuracy {router['best']['val_accuracy']}, test accuracy {report['accuracy']}")
    print(f"deployed {len(manifest['files'])} files to {VOLUME_NAMES[CHECKPOINTS]}:/{DEPLOY_DIR}")
