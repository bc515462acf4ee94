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
from .layout import HISTORY_DB, LABEL_MAP_FILE, SPLITS
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
    from .data.formats import (
        Location,
        RecordError,
        Reject,
        read_dataset,
        read_jsonl_samples,
    )
    from .data.preprocess import preprocess_splits
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
        run.metrics.update(
            {
                "accuracy": report["accuracy"],
                "macro_f1": report["macro_f1"],
                "ece": report["calibration"]["ece"],
            }
        )
        run.metrics.update({f"top{k}": v for k, v in report["top_k"].items() if k != "1"})
        if consistency:
            run.metrics["batch_invariance"] = report["consistency"]["batch_invariance"]
            run.metrics["perturbation_consistency"] = report["consistency"]["perturbation_mean"]
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


def deploy(
    checkpoint: str | Path,
    experts_dir: str | Path,
    dest: str,
    workdir: str | Path = ".",
    min_accuracy: float | None = None,
    force: bool = False,
    eval_report: str | Path | None = None,
) -> dict:
    """Deploy the router checkpoint and every expert it routes to into `dest`.

    With `min_accuracy`, the router's recorded evaluation (eval/router_check.py) must reach it, else
    nothing is deployed (unless `force`); `eval_report` names the `mole eval router` report to use.
    """
    import json

    from .adapter_info import check_same_base, find_adapter_dir, read_adapter_info
    from .deploy import deploy as run_deploy
    from .layout import EXPERT_INFO_FILE

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
    config = {"checkpoint": str(checkpoint), "experts_dir": str(experts_dir), "dest": dest}
    if min_accuracy is not None:
        config.update(min_accuracy=min_accuracy, force=force, eval_report=eval_report and str(eval_report))
    if "://" not in dest or dest.startswith("file://"):
        recorder = _writer_run(workdir, "deploy", config, None, dest.removeprefix("file://"))
    else:  # a bucket is not locked: object stores have no atomic exclusive create
        recorder = record_run(_db(workdir), "deploy", config)
    with recorder as run:
        if min_accuracy is not None:  # inside the run: a refusal is recorded as a failed deploy
            from .eval.router_check import check_deployable

            gate = check_deployable(checkpoint, min_accuracy, force, eval_report)
            run.metrics.update(router_accuracy=gate["accuracy"], forced=int(gate["forced"]))
        manifest = run_deploy(str(router), experts, label_map, dest, metadata)
        run.metrics["files"] = len(manifest["files"])
        run.artifacts["deployment"] = dest
    return (
        manifest
        if min_accuracy is None
        else {**manifest, "router_gate": {**gate, "min_accuracy": min_accuracy}}
    )


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
) -> list[dict]:
    """Route and generate for request samples with a deployment (`base_model` overrides the recorded one)."""
    from .infer.stacked import StackedModel

    config = {"deployment": deployment, "requests": len(samples), "expert": expert, "base_model": base_model}
    with record_run(_db(workdir), "infer", config) as run:
        model = StackedModel(deployment, device, dtype, base_model=base_model)
        results = model(samples, batch_size, max_new_tokens, expert)
        run.metrics["requests"] = len(results)
    return results
