"""Stage functions: what each `mole` command (and each Modal function) runs, with its run record.

Every stage is a plain function taking paths and options, returning a JSON-serialisable result,
and recording itself in the work directory's run history. The CLI and the Modal app are thin
layers over these.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .config import (
    DatasetConfig,
    ImageSpec,
    LorasConfig,
    RouterConfig,
    load_config,
    load_model_config,
    to_dict,
)
from .data.formats import dataset_exists, split_dataset_path
from .errors import UserError
from .history import record_run
from .layout import HISTORY_DB, HISTORY_REPORT_FILE, LABEL_MAP_FILE, SPLITS, TRAIN_LOG_FILE
from .train.distributed import env_rank


def _db(workdir: str | Path) -> Path:
    return Path(workdir) / HISTORY_DB


@contextmanager
def _writer_run(
    workdir: str | Path,
    stage: str,
    config: dict,
    digest: str | None,
    output: str | Path,
    folders: list[Path] | None = None,
    resume: bool = False,
):
    """Lock the output `folders` (default: `output`) for the whole run, then record_run it.

    A live writer holding one of them makes this a UserError before anything is written or recorded.
    Under torchrun only rank 0 locks and records (one lock, one row per run).
    """
    from .history import RunRecord
    from .locking import output_locks

    if env_rank() != 0:
        yield RunRecord(run_id="")
        return
    with output_locks(folders or [output], stage) as locks:
        stale = [holder for lock in locks for holder in lock.taken_over]
        with record_run(_db(workdir), stage, config, digest, output, resume, stale) as run:
            yield run


@contextmanager
def _curves(run, logs: dict[str, Path]):
    """Store the training curves of the enclosed training as the run's metric rows: every numeric key
    of each train_log.jsonl line (names prefixed by the dict's key), also when the training fails.

    A log left by an earlier run (not written since this run began) is not this run's and is ignored.
    When the training failed, a failure to store its rows is logged: the training's error is raised.
    """
    import logging
    import time

    from .history_backfill import log_rows

    began = time.time()

    def store() -> None:
        for prefix, path in logs.items():
            if path.is_file() and path.stat().st_mtime >= began - 1:
                run.add_metric_rows(log_rows(path, prefix))

    try:
        yield
    except BaseException:
        try:
            store()
        except Exception as exc:  # noqa: BLE001 - the training's error is the one the user needs
            logging.getLogger(__name__).warning(
                "could not store the training curves of run %s: %s", run.run_id, exc
            )
        raise
    store()


def input_digest(path: str | Path) -> str:
    """Digest of one data input, every file streamed: a preprocessed cache by its identity (its
    meta.json, which records its input's digest, and each file's name and size: the shards are not
    read), a folder or DIR#NAME by every file's name and bytes, a file by its bytes.

    Computed once per run: a stage passes it on to what it runs instead of hashing again.
    """
    from .data.preprocess import dataset_digest, is_preprocessed
    from .hashing import sha256_file
    from .train.checkpoint import data_identity

    p = Path(path)
    if is_preprocessed(p):
        return data_identity(p)
    if p.is_dir() or dataset_exists(p):  # a folder, or DIR#NAME (a LLaMA-Factory dataset)
        return dataset_digest(p)
    if p.is_file():
        return sha256_file(p)
    raise UserError(f"{p}: not found")


def data_hash(*paths: str | Path, digests: list[str] | None = None) -> str:
    """sha256 over the inputs' digests (input_digest of each path, or `digests` already computed)."""
    import hashlib

    h = hashlib.sha256()
    for d in digests if digests is not None else map(input_digest, paths):
        h.update(d.encode())
    return h.hexdigest()


def model_tiny(
    out: str | Path, workdir: str | Path = ".", seed: int = 0, processor: str | Path | None = None
) -> dict:
    """Build the tiny offline Qwen3-VL into `out` (around the processor folder `processor`, if given)."""
    from dataclasses import asdict

    from .model.tiny import REAL_VOCAB_SIZES, TinySpec, build_tiny_model

    spec = TinySpec(seed=seed, **(REAL_VOCAB_SIZES if processor is not None else {}))
    config = {**asdict(spec), "processor": str(processor) if processor is not None else None}
    with record_run(_db(workdir), "model.tiny", config) as run:
        path = build_tiny_model(out, spec, processor)
        run.artifacts["model"] = str(path)
    return {"model": str(path)}


def data_synth(
    out: str | Path,
    workdir: str | Path = ".",
    experts: list[str] | None = None,
    counts: dict[str, int | None] | None = None,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """Write the synthetic GUI expert datasets into `out/<expert>/` (splits not given: synth's defaults)."""
    from .data.synth import DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE, SYNTH_EXPERTS, synthesize

    counts = {**DEFAULT_COUNTS, **{k: v for k, v in (counts or {}).items() if v is not None}}
    image_size = image_size or DEFAULT_IMAGE_SIZE

    config = {
        "experts": list(experts or SYNTH_EXPERTS),
        "counts": counts,
        "seed": seed,
        "image_size": list(image_size),
    }
    with record_run(_db(workdir), "data.synth", config) as run:
        result = synthesize(out, experts or SYNTH_EXPERTS, counts, seed, image_size)
        run.metrics["records"] = sum(sum(c.values()) for c in result.values())
        run.artifacts["datasets"] = str(out)
    return result


def data_routing(config: str | Path, output: str | Path, workdir: str | Path = ".") -> dict:
    """Build the routing dataset described by dataset.yaml into `output` (+ label map, stats)."""
    from .data.routing import build_routing_dataset

    cfg = load_config(config, DatasetConfig)
    for name, src in cfg.experts.items():
        if not src.path or not dataset_exists(src.path):
            raise UserError(
                f"{config}: experts.{name}.path: dataset folder {src.path or '(empty)'} not found"
            )
    digest = data_hash(*(src.path for src in cfg.experts.values()))
    with _writer_run(workdir, "data.routing", to_dict(cfg), digest, Path(output).resolve().parent) as run:
        stats = build_routing_dataset(cfg, output, source=str(config))
        run.metrics.update({"records": stats["records"], "imbalance_ratio": stats["imbalance_ratio"]})
        run.artifacts["routing_data"] = str(output)
    return stats


def data_check(path: str | Path, workdir: str | Path = ".") -> dict:
    """Check a routing dataset folder (or JSONL); return the report, raise DataCheckFailed on violations."""
    from .data.check import DataCheckFailed, check_routing_dataset

    if not Path(path).exists():
        raise UserError(f"{path}: not found (expected a routing dataset folder or its .jsonl file)")
    with record_run(_db(workdir), "data.check", {"path": str(path)}, data_hash(path)) as run:
        report = check_routing_dataset(path)
        run.metrics.update({"records": report["records"], "violations": len(report["violations"])})
        if report["violations"]:
            raise DataCheckFailed(report)
    return report


def data_ocr_crops(
    input: str | Path,
    output: str | Path,
    workdir: str | Path = ".",
    padding: int | None = None,
    boxes_out: str | Path | None = None,
    engine: str | None = None,
    min_confidence: float | None = None,
    join_gap: float | None = None,
) -> dict:
    """Crop the text lines of an expert dataset or image folder into an OCR dataset (see data/ocr.py)."""
    from .data.ocr import DEFAULT_PADDING, make_ocr_crops
    from .data.ocr_engines import DEFAULT_JOIN_GAP, DEFAULT_MIN_CONFIDENCE, check_engine

    padding = DEFAULT_PADDING if padding is None else padding
    min_confidence = DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence
    join_gap = DEFAULT_JOIN_GAP if join_gap is None else join_gap
    if not Path(input).exists():
        raise UserError(f"{input}: input not found (expected an expert dataset folder or a folder of images)")
    engine = check_engine(engine)
    config = {
        "input": str(input),
        "output": str(output),
        "padding": padding,
        "boxes_out": boxes_out,
        "engine": engine,
        "min_confidence": min_confidence,
        "join_gap": join_gap,
    }
    with record_run(_db(workdir), "data.ocr_crops", config, data_hash(input)) as run:
        summary = make_ocr_crops(
            input, output, padding, boxes_out, engine=engine, min_confidence=min_confidence, join_gap=join_gap
        )
        run.metrics.update({f"crops_{k}": v for k, v in summary["crops"].items()})
        run.metrics["images_skipped"] = summary["images_skipped"]
        run.artifacts["ocr_crops"] = str(output)
    return summary


def data_preprocess(
    input: str | Path,
    output: str | Path,
    model: str | None,
    task: str = "sft",
    label_map: str | Path | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    workdir: str | Path = ".",
    progress=None,
    config: str | Path | None = None,
    workers: int = 1,
    strict: bool = False,
) -> dict:
    """Preprocess an expert dataset folder or a routing JSONL into a training cache folder.

    With `config` (a router.yaml or a loras.yaml, whatever the task), the base model and the pixel
    budget default to the config's, so the data matches what that training run checks for.
    `workers` processes encode in parallel; bad records go to rejects.jsonl, or fail with `strict`.
    """
    if config is not None:
        cfg = load_model_config(config)
        model = model or cfg.base_model
        min_pixels = cfg.image.min_pixels if min_pixels is None else min_pixels
        max_pixels = cfg.image.max_pixels if max_pixels is None else max_pixels
    if not model:
        raise UserError(
            "preprocess needs --model (a base folder or hub id) or --config (router.yaml / loras.yaml)"
        )
    from .data.formats import read_dataset
    from .data.preprocess import preprocess_splits
    from .data.records import Location, RecordError, Reject, read_jsonl_samples
    from .data.routing import load_label_map

    if min_pixels is not None and max_pixels is not None and ImageSpec(min_pixels, max_pixels).problems():
        raise UserError(f"--min-pixels {min_pixels} must not exceed --max-pixels {max_pixels}")
    input = Path(input)
    # images are decoded by the (parallel) encoding, not here: a bad one becomes a reject there
    if dataset_exists(input):
        splits, rejects = read_dataset(input, decode=False, strict=strict)
    elif input.is_file():
        samples, rejects = read_jsonl_samples(input, decode=False, strict=strict)
        for s in [s for s in samples if not s.split]:
            err = RecordError(
                Location(s.file, s.line),
                "a JSONL input needs a 'split' field on every record (routing data has one); "
                "for an expert dataset pass its folder",
                s.id,
            )
            if strict:
                raise err
            rejects.append(Reject.of(err))
        splits = {sp: [s for s in samples if s.split == sp] for sp in SPLITS}
    else:
        raise UserError(f"{input}: not found (expected a dataset folder or a routing JSONL file)")
    lm = None
    if task == "router":
        lm_path = (
            Path(label_map)
            if label_map
            else (split_dataset_path(input)[0] if dataset_exists(input) else input.parent) / LABEL_MAP_FILE
        )
        lm = load_label_map(lm_path)
    config = {
        "input": str(input),
        "model": model,
        "task": task,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }
    digest = data_hash(input)
    with _writer_run(workdir, "data.preprocess", config, digest, output) as run:
        meta = preprocess_splits(
            splits,
            output,
            model,
            task,
            lm,
            min_pixels,
            max_pixels,
            progress=progress,
            source=digest,  # in meta.json: the cache's identity names the data it was made from
            workers=workers,
            strict=strict,
            rejects=rejects,
        )
        run.metrics.update({f"{k}_examples": v for k, v in meta["counts"].items()})
        run.metrics["rejected"] = meta["records"]["rejected"]
        run.artifacts["preprocessed"] = str(output)
    return meta


def data_convert(
    input: str | Path,
    output: str | Path,
    to: str = "messages",
    workdir: str | Path = ".",
    strict: bool = False,
) -> dict:
    """Rewrite a dataset folder (messages/ShareGPT JSONL or HF datasets) as `to` into `output`."""
    from .data.convert import convert_dataset

    if not dataset_exists(input):
        raise UserError(f"{input}: dataset folder not found")
    config = {"input": str(input), "output": str(output), "to": to, "strict": strict}
    with record_run(_db(workdir), "data.convert", config, data_hash(input)) as run:
        result = convert_dataset(input, output, to, strict)
        run.metrics.update({f"{k}_records": v for k, v in result["records"].items()})
        run.artifacts["dataset"] = str(output)
    return result


def train_experts(
    config: str | Path,
    workdir: str | Path = ".",
    only: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    report=print,
    resume: bool = False,
    concurrent: bool = False,
) -> dict:
    """Train the expert LoRAs of loras.yaml (continuing from their checkpoints with `resume`).

    With `concurrent`, all experts train together in one pass over one copy of the base.
    """
    from .train.experts import train_experts as run_experts

    cfg = load_config(config, LorasConfig)
    for name in only or cfg.experts:
        entry = cfg.experts.get(name)
        if entry is not None and (not entry.data or not dataset_exists(entry.data)):
            raise UserError(f"{config}: experts.{name}.data: folder {entry.data or '(empty)'} not found")
    names = [n for n in only or cfg.experts if n in cfg.experts]
    digests = {n: input_digest(cfg.experts[n].data) for n in names}  # once: passed on to preprocessing
    digest = data_hash(digests=list(digests.values()))
    record = {**to_dict(cfg), "concurrent": concurrent}
    folders = [Path(cfg.output_dir) / n for n in names]  # per expert: `--only` runs on others may go on
    with _writer_run(workdir, "train.experts", record, digest, cfg.output_dir, folders, resume) as run:
        logs = {f"{n}/": Path(cfg.output_dir) / n / TRAIN_LOG_FILE for n in names}
        with _curves(run, logs):
            results = run_experts(
                cfg, only, device, dtype, report, resume=resume, concurrent=concurrent, digests=digests
            )
        for name, r in results.items():
            run.metrics[f"{name}.{r['metric']}"] = r["value"]
            run.metrics[f"{name}.base_{r['metric']}"] = r["base_value"]
            run.metrics[f"{name}.best_val_loss"] = r["best_val_loss"]
            run.artifacts[name] = r["adapter"]
    return results


def train_router(
    dataset_path: str | Path,
    config: str | Path,
    workdir: str | Path = ".",
    device: str = "auto",
    dtype: str = "auto",
    report=print,
    resume: bool = False,
) -> dict:
    """Train the router adapter on a preprocessed router dataset (from its checkpoint with `resume`)."""
    from .train.router import train_router as run_router

    cfg = load_config(config, RouterConfig)
    if not Path(dataset_path).is_dir():
        raise UserError(f"{dataset_path}: preprocessed router dataset not found")
    config_record = {**to_dict(cfg), "dataset": str(dataset_path)}
    identity = input_digest(dataset_path)  # once: also the checkpoints' data identity
    digest = data_hash(digests=[identity])
    with _writer_run(workdir, "train.router", config_record, digest, cfg.output_dir, resume=resume) as run:
        with _curves(run, {"": Path(cfg.output_dir) / TRAIN_LOG_FILE}):
            info = run_router(dataset_path, cfg, device, dtype, report, resume=resume, data_id=identity)
        run.metrics.update(info["best"])
        run.artifacts["adapter"] = info["adapter"]
    return info


def eval_router(
    checkpoint: str | Path,
    test_data: str | Path,
    output: str | Path | None = None,
    split: str | None = "test",
    workdir: str | Path = ".",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    consistency: bool = False,
    base_model: str | None = None,
) -> dict:
    """Evaluate a router checkpoint on routing records and write the JSON report."""
    from .eval.router_eval import evaluate_router
    from .history_backfill import eval_metrics

    config = {
        "checkpoint": str(checkpoint),
        "test_data": str(test_data),
        "split": split,
        "consistency": consistency,
    }
    with record_run(_db(workdir), "eval.router", config, data_hash(test_data)) as run:
        report = evaluate_router(
            checkpoint,
            test_data,
            output,
            split,
            batch_size,
            device,
            dtype,
            consistency=consistency,
            base_model=base_model,
        )
        # scalars, and the confusion matrix, calibration bins and consistency the history report draws
        run.metrics.update(eval_metrics(report))
        run.artifacts["report"] = report["report_path"]
    return report


def test_router(
    checkpoint: str | Path,
    test_data: str | Path,
    per_expert: int | None = None,
    min_accuracy: float | None = None,
    split: str | None = "test",
    workdir: str | Path = ".",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
) -> dict:
    """Route a small held-out sample per expert; `passed` says whether accuracy >= `min_accuracy`."""
    from .eval.router_check import DEFAULT_PER_EXPERT, quick_test_router

    per_expert = DEFAULT_PER_EXPERT if per_expert is None else per_expert
    config = {
        "checkpoint": str(checkpoint),
        "test_data": str(test_data),
        "split": split,
        "per_expert": per_expert,
        "min_accuracy": min_accuracy,
    }
    with record_run(_db(workdir), "test.router", config, data_hash(test_data)) as run:
        result = quick_test_router(
            checkpoint, test_data, per_expert, min_accuracy, split, batch_size, device, dtype, base_model
        )
        run.metrics.update(
            {"accuracy": result["accuracy"], "n": result["n"], "passed": int(result["passed"])}
        )
    return result


def _router_evaluation(checkpoint: str | Path, eval_report: str | Path | None) -> dict | None:
    """The router's recorded evaluation figures for the manifest (None: nothing recorded)."""
    import json

    from .eval.router_check import recorded_evaluation

    try:
        rec = recorded_evaluation(checkpoint, eval_report)
    except UserError as exc:  # a report of other weights or of the train split: say so, deploy anyway
        return {"error": str(exc)}
    if rec is None:
        return None
    try:
        data = json.loads(Path(rec["source"]).read_text())
    except (OSError, ValueError):
        data = {}
    if "best" in data:  # router_info.json: the validation figures of the best step
        figures = {k: v for k, v in data["best"].items() if isinstance(v, int | float)}
    else:
        calibration = data.get("calibration") or {}
        figures = {k: data.get(k) for k in ("split", "n", "accuracy", "macro_f1", "top_k")}
        figures["ece"] = calibration.get("ece")
    return {**rec, "figures": figures}


def _producing_runs(workdir: str | Path, router: Path, experts: dict[str, str]) -> dict:
    """Run ids (this work dir's history) of the training runs that wrote the deployed adapters.

    Adapter folders record no run id; the history's ok train runs record the adapter paths they wrote,
    so the newest run whose artifact is the deployed folder is the one. None where none matches.
    """
    from .history import History

    found = {"router": None, "experts": dict.fromkeys(experts)}
    if not _db(workdir).is_file():
        return found
    want = {Path(path).resolve(): name for name, path in experts.items()}
    for run in History(_db(workdir)).runs("train", "ok"):
        for key, value in (run["artifacts"] or {}).items():
            if not isinstance(value, str):
                continue
            path = Path(value).resolve()
            if run["stage"] == "train.router" and key == "adapter" and path == router.resolve():
                found["router"] = found["router"] or run["run_id"]
            elif run["stage"] == "train.experts" and want.get(path) == key and found["experts"][key] is None:
                found["experts"][key] = run["run_id"]
    return found


def _dest_lock_run(workdir: str | Path, stage: str, config: dict, dest: str, must_exist: bool = False):
    """Record a run changing `dest`; a local DEST is locked for it (an object store cannot be).

    With `must_exist`, a local DEST that is not there is a UserError before anything is created (the
    lock would otherwise make the folder, and a mistyped path would read as an empty destination).
    """
    if "://" not in dest or dest.startswith("file://"):
        local = dest.removeprefix("file://")
        if must_exist and not Path(local).exists():
            raise UserError(f"{local}: not found (expected a deploy destination)")
        return _writer_run(workdir, stage, config, None, local)
    return record_run(_db(workdir), stage, config)


def deploy(
    checkpoint: str | Path,
    experts_dir: str | Path,
    dest: str,
    workdir: str | Path = ".",
    min_accuracy: float | None = None,
    force: bool = False,
    eval_report: str | Path | None = None,
) -> dict:
    """Deploy the router checkpoint and every expert it routes to into `dest` as a new release.

    With `min_accuracy`, the router's recorded evaluation (eval/router_check.py) must reach it, else
    nothing is deployed (unless `force`); `eval_report` names the `mole eval router` report to use.
    The manifest records the router's evaluation figures and the runs that trained the adapters.
    """
    import json

    from .adapter_info import check_same_base, find_adapter_dir, read_adapter_info
    from .deploy import deploy as run_deploy
    from .layout import EXPERT_INFO_FILE
    from .storage import redact

    router = find_adapter_dir(checkpoint)
    router_info = read_adapter_info(router, "router")
    label_map = router_info["label_map"]
    experts, metadata = {}, {}
    for name in label_map:
        folder = Path(experts_dir) / name
        experts[name] = str(find_adapter_dir(folder))
        check_same_base(read_adapter_info(experts[name], "expert"), router_info, experts[name])
        info_file = folder / EXPERT_INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        metadata[name] = {k: info.get(k) for k in ("metric", "value", "base_value", "data", "steps")}
    from .locking import refuse_if_written

    # the router's output folder (the checkpoint, or the folder above its adapter) and each expert's
    refuse_if_written(list(dict.fromkeys([Path(checkpoint), router.parent])), "the router")
    refuse_if_written([Path(experts_dir) / name for name in label_map], "an expert")
    config = {"checkpoint": str(checkpoint), "experts_dir": str(experts_dir), "dest": redact(dest)}
    if min_accuracy is not None:
        config.update(min_accuracy=min_accuracy, force=force, eval_report=eval_report and str(eval_report))
    with _dest_lock_run(workdir, "deploy", config, dest) as run:
        if min_accuracy is not None:  # inside the run: a refusal is recorded as a failed deploy
            from .eval.router_check import check_deployable

            gate = check_deployable(checkpoint, min_accuracy, force, eval_report)
            run.metrics.update(router_accuracy=gate["accuracy"], forced=int(gate["forced"]))
        info = {
            "router_evaluation": _router_evaluation(checkpoint, eval_report),
            "runs": _producing_runs(workdir, router, experts),
        }
        manifest = run_deploy(str(router), experts, label_map, dest, metadata, None, info)
        run.metrics["files"] = len(manifest["files"])
        run.artifacts["deployment"] = redact(dest)
        if manifest.get("release"):
            run.artifacts["release"] = manifest["release"]
    return (
        manifest
        if min_accuracy is None
        else {**manifest, "router_gate": {**gate, "min_accuracy": min_accuracy}}
    )


def deploy_list(dest: str) -> dict:
    """The releases at `dest` (releases.list_releases), with which one CURRENT names."""
    from .releases import list_releases
    from .storage import open_fs, redact, storage_errors

    with storage_errors(dest, "listing releases"):
        fs, root = open_fs(dest)
        return list_releases(fs, root, redact(dest))


def deploy_verify(dest: str, release: str | None = None) -> dict:
    """Re-hash every file of a release (default: CURRENT's) against its manifest; see deploy.verify_deployment."""
    from .deploy import verify_deployment
    from .storage import storage_errors

    with storage_errors(dest, "verify"):
        return verify_deployment(dest, release)


def deploy_promote(dest: str, release: str, workdir: str | Path = ".") -> dict:
    """Point `dest`'s CURRENT at `release`, after verifying it (recorded in the history)."""
    from .releases import promote
    from .storage import redact, storage_errors

    with _dest_lock_run(
        workdir, "deploy.promote", {"dest": redact(dest), "release": release}, dest, True
    ) as run:
        with storage_errors(dest, "promote", "CURRENT unchanged"):
            result = promote(dest, release)
        run.artifacts.update(release=result["release"], replaced=result["replaced"])
    return result


def deploy_rollback(dest: str, workdir: str | Path = ".") -> dict:
    """Point `dest`'s CURRENT back at the release it named before (recorded in the history)."""
    from .releases import rollback
    from .storage import redact, storage_errors

    with _dest_lock_run(workdir, "deploy.rollback", {"dest": redact(dest)}, dest, True) as run:
        with storage_errors(dest, "rollback", "CURRENT unchanged"):
            result = rollback(dest)
        run.artifacts.update(release=result["release"], replaced=result["replaced"])
    return result


def deploy_gc(dest: str, keep: int, workdir: str | Path = ".", grace_s: float | None = None) -> dict:
    """Remove old releases at `dest`, keeping the newest `keep`, CURRENT and its predecessor; an
    incomplete release on an object store is removed once older than `grace_s` (releases.gc)."""
    from .releases import INCOMPLETE_GRACE_S, gc
    from .storage import redact, storage_errors

    grace_s = INCOMPLETE_GRACE_S if grace_s is None else grace_s
    config = {"dest": redact(dest), "keep": keep, "grace_s": grace_s}
    with _dest_lock_run(workdir, "deploy.gc", config, dest, True) as run:
        with storage_errors(dest, "gc"):
            result = gc(dest, keep, grace_s=grace_s)
        run.metrics.update(removed=len(result["removed"]), kept=len(result["kept"]))
    return result


def infer(
    deployment: str,
    samples,
    workdir: str | Path = ".",
    batch_size: int = 8,
    expert: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int | None = None,
    base_model: str | None = None,
    output: str | Path | None = None,
    min_probability: float | None = None,
    fallback: str | None = None,
    on_result=None,
) -> list[dict]:
    """Route and answer request samples with a deployment through the engine (infer/engine.py).

    `base_model` overrides the recorded base; below `min_probability` the `fallback` answers. Each
    batch's results are written to `output` (JSONL, flushed) and passed to `on_result` as soon as
    that batch is answered; all results are returned in request order.
    """
    from .infer.engine import Engine, Request
    from .infer.stacked import ResultWriter
    from .storage import redact

    config = {
        "deployment": redact(deployment),
        "requests": len(samples),
        "expert": expert,
        "base_model": base_model,
        "min_probability": min_probability,
        "fallback": fallback,
    }
    with record_run(_db(workdir), "infer", config) as run:
        engine = Engine(
            deployment,
            device,
            dtype,
            base_model=base_model,
            min_probability=min_probability,
            fallback=fallback,
        )
        requests = [Request(s, expert=expert, max_new_tokens=max_new_tokens) for s in samples]
        engine.check_all(requests)  # a bad line refuses the run before any output is written
        writer = ResultWriter(output) if output is not None else None
        results = []
        try:
            for res in engine.iter_run(requests, batch_size):
                results.append(res.to_dict())
                if writer is not None:
                    writer.write(results[-1])
                if on_result is not None:
                    on_result(results[-1])
        finally:
            if writer is not None:
                writer.close()
        run.metrics["requests"] = len(results)
        run.metrics["fallbacks"] = sum(r["fallback"] is not None for r in results)
        if output is not None:
            run.artifacts["output"] = str(output)
    return results


def history_show(workdir: str | Path = ".", stage: str | None = None, limit: int | None = None) -> list[dict]:
    """The runs of the work directory's history (SQLite and JSONL merged), newest first."""
    from .history_view import read_history

    runs = read_history(workdir).runs
    if stage is not None:
        runs = [r for r in runs if r["stage"] == stage or r["stage"].startswith(stage + ".")]
    return runs[:limit] if limit is not None else runs


def history_backfill(folder: str | Path, workdir: str | Path = ".") -> dict:
    """Import the past runs found below `folder` into the work directory's history (idempotent)."""
    from .history import open_history
    from .history_backfill import backfill
    from .history_view import read_history

    existing = read_history(workdir).runs
    return backfill(open_history(_db(workdir)), existing, folder)


def history_report(workdir: str | Path = ".", output: str | Path | None = None) -> dict:
    """Write the history report (one self-contained HTML page); returns its path and figure names."""
    from .history_report import write_report

    return write_report(workdir, output or Path(workdir) / HISTORY_REPORT_FILE)


def history_plot(workdir: str | Path, output_dir: str | Path, run_id: str | None = None) -> dict:
    """Write the report's figures (of one run, or all) as PNG files into `output_dir`."""
    from .history_report import write_plots

    return write_plots(workdir, output_dir, run_id)


def serve_app(settings, cache_dir: str | None = None):
    """The server's ASGI app (serve.settings.ServeConfig): the deployment loaded once into the engine."""
    from .infer.engine import Engine
    from .serve.app import ServedStack, build_app

    limits = settings.limits()
    if limits.allow_files is not None and not limits.allow_files.is_dir():
        raise UserError(f"--allow-files {limits.allow_files}: not a folder")
    engine = Engine(
        settings.deployment,
        settings.device,
        settings.dtype,
        settings.base_model,
        cache_dir,
        settings.min_probability,
        settings.fallback,
    )
    stack = ServedStack(engine, engine.names, engine.base_model)
    return build_app(stack, limits, settings.max_batch, settings.max_wait_ms)


def serve(settings, host: str, port: int, workdir: str | Path = ".") -> dict:
    """Run `mole serve` until SIGTERM / Ctrl-C (in-flight requests finish first); recorded as one run."""
    import uvicorn

    from .serve.defaults import SHUTDOWN_GRACE_S
    from .storage import redact

    config = {**to_dict(settings), "host": host, "port": port}
    config["deployment"] = redact(config["deployment"])
    with record_run(_db(workdir), "serve", config) as run:
        app = serve_app(settings)
        with _stop_quietly_on_sigterm():
            uvicorn.run(
                app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
            )
        answered = app.state.metrics.answered()
        run.metrics.update(answered)
    return answered


class _Stopped(Exception):
    pass


@contextmanager
def _stop_quietly_on_sigterm():
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again: end normally instead
    (the run is recorded as finished and the exit status is 0)."""
    import signal

    def stop(signum, frame):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
