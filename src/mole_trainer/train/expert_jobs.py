"""One expert's job in `mole train experts`, shared by the sequential (train/experts.py) and the
concurrent (train/concurrent.py) paths: its preprocessed data and splits, the task score of the
untrained base on its test records, and, once trained, its final score, PEFT adapter and expert_info.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter_info import write_adapter_info
from ..config import ExpertEntry, LorasConfig, LoraSpec, TrainSpec, to_dict
from ..data.formats import dataset_exists, load_expert_dataset
from ..data.preprocess import (
    check_compatible,
    dataset_digest,
    is_preprocessed,
    load_preprocessed,
    preprocess_splits,
    sample_from_dict,
)
from ..data.records import Sample
from ..errors import UserError
from ..eval.task_metrics import TASK_METRICS, score_many
from ..hashing import code_digest, fingerprint
from ..infer.generate import generate
from ..layout import EXPERT_INFO_FILE, PREPROCESS_META_FILE
from ..model.loading import load_processor, processor_digest
from .distributed import barrier, current

DEFAULT_TASK = "text"  # records without metadata.task are scored by character similarity


def prepared_data(
    name: str, data: str, cache: Path, model: str, cfg: LorasConfig, digest: str | None = None
) -> Path:
    """A preprocessed folder for the expert: `data` itself if already preprocessed, else a cache.

    `digest` is the dataset's digest when the caller has already computed it (dataset_digest).
    """
    if is_preprocessed(data):
        return Path(data)
    if not dataset_exists(data):
        raise UserError(f"experts.{name}.data: {data} is not a dataset folder")
    # the cache is reused only for the same data, processor, pixel budget and code; such a cache was
    # made after the checks below passed on this data, so a hit skips reading and decoding it again
    source = fingerprint(
        dataset_digest(data) if digest is None else digest,
        processor_digest(model),
        cfg.image.min_pixels,
        cfg.image.max_pixels,
        code_digest(),
    )
    if (
        is_preprocessed(cache)
        and json.loads((cache / PREPROCESS_META_FILE).read_text()).get("source") == source
    ):
        return cache
    splits = load_expert_dataset(data)
    for split in ("train", "val"):
        if not splits[split]:
            raise UserError(
                f"{data}: expert '{name}' has no {split} records ({split}.jsonl missing or empty)"
            )
    preprocess_splits(
        splits, cache, model, "sft", None, cfg.image.min_pixels, cfg.image.max_pixels, source=source
    )
    return cache


def task_score(samples: list[Sample], predictions: list[str]) -> dict:
    """The expert task metric of predictions (the task comes from the records' metadata)."""
    tasks = {s.metadata.get("task", DEFAULT_TASK) for s in samples}
    if len(tasks) != 1:
        raise UserError(f"test records mix tasks {sorted(tasks)}: one expert dataset must have one task")
    (task,) = tasks
    if task not in TASK_METRICS:
        raise UserError(
            f"{samples[0].source}: metadata.task '{task}' is not one of {', '.join(TASK_METRICS)}"
        )
    return score_many(task, predictions, [s.answer for s in samples])


@dataclass
class ExpertJob:
    """Everything one expert's training needs, loaded once: settings, data, processor, base scores."""

    name: str
    entry: ExpertEntry
    lora: LoraSpec
    spec: TrainSpec
    out: Path
    meta: dict
    train_examples: Sequence
    val_examples: Sequence
    test_samples: list[Sample]
    processor: object
    pad_id: int
    prep: Path
    base_preds: list[str] = field(default_factory=list)
    base_score: dict | None = None


def expert_names(cfg: LorasConfig, only: list[str] | None) -> list[str]:
    """The experts to train: `only` those (checked against the config) or all of them."""
    names = only or list(cfg.experts)
    missing = [n for n in names if n not in cfg.experts]
    if missing:
        raise UserError(f"unknown expert(s) {missing}; the config has {list(cfg.experts)}")
    if not names:
        raise UserError("the config lists no experts")
    return names


def prepare_expert(cfg: LorasConfig, name: str, digest: str | None = None) -> ExpertJob:
    """Preprocess (or reuse) an expert's data, check it against the config and load its splits.

    `digest`: the data's digest, when the caller has it (not hashed again).
    """
    entry = cfg.experts[name]
    lora, spec = cfg.resolved(name)
    out = Path(cfg.output_dir) / name
    dist = current()
    if not dist.main:
        barrier(dist)  # rank 0 builds the preprocessing cache first; the others then reuse it
    prep = prepared_data(name, entry.data, out / "prep", cfg.base_model, cfg, digest)
    if dist.main:
        barrier(dist)
    meta, train = load_preprocessed(prep, "train")
    check_compatible(meta, "sft", cfg.base_model, cfg.image, prep)
    processor = load_processor(cfg.base_model, meta["min_pixels"], meta["max_pixels"])
    _, val = load_preprocessed(prep, "val")
    _, test = load_preprocessed(prep, "test")
    if not train["examples"] or not val["examples"]:
        raise UserError(f"{prep}: expert '{name}' needs train and val examples (keep-best reads val)")
    test_samples = [sample_from_dict(d) for d in test["samples"]]
    if cfg.eval_records:
        test_samples = test_samples[: cfg.eval_records]
    return ExpertJob(
        name,
        entry,
        lora,
        spec,
        out,
        meta,
        train["examples"],
        val["examples"],
        test_samples,
        processor,
        processor.tokenizer.pad_token_id,
        prep,
    )


def score_base(base, job: ExpertJob, report=print) -> None:
    """Score the untrained base on the expert's test records (stored on the job)."""
    report(f"[{job.name}] scoring the untrained base on {len(job.test_samples)} test records")
    if job.test_samples:
        job.base_preds = generate(base, job.processor, job.test_samples, job.entry.max_new_tokens)
        job.base_score = task_score(job.test_samples, job.base_preds)


def train_stats(outcome, seconds: float) -> dict:
    """The training figures an expert_info records, from a TrainResult or a concurrent ExpertOutcome.

    `seconds` is the wall time of the run that trained the expert (shared by all experts when
    they trained together), so samples_per_s is this expert's share of it.
    """
    return {
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "best_val_loss": outcome.best_metrics["val_loss"],
        "stopped_early": outcome.stopped_early,
        "train_seconds": round(seconds, 2),
        "samples_per_s": round(outcome.samples_seen / max(seconds, 1e-9), 2),
    }


def score_and_save(model, job: ExpertJob, cfg: LorasConfig, stats: dict, report=print) -> dict:
    """Score the trained expert (a PEFT model), save its adapter + metadata; returns expert_info.

    `stats` holds the training figures: steps, best_step, best_val_loss, stopped_early,
    train_seconds, samples_per_s (and whatever else the caller records, e.g. the mode).
    """
    samples = job.test_samples
    preds = generate(model, job.processor, samples, job.entry.max_new_tokens) if samples else []
    score = task_score(samples, preds) if samples else None
    adapter_dir = job.out / "adapter"
    model.save_pretrained(adapter_dir)
    write_adapter_info(
        adapter_dir,
        {
            "role": "expert",
            "expert": job.name,
            "base_model": cfg.base_model,
            "min_pixels": job.meta["min_pixels"],
            "max_pixels": job.meta["max_pixels"],
            "max_new_tokens": job.entry.max_new_tokens,
        },
    )
    info = {
        "expert": job.name,
        "data": job.entry.data,
        "adapter": str(adapter_dir),
        **stats,
        "metric": score["metric"] if score else None,
        "value": score["value"] if score else None,
        "base_value": job.base_score["value"] if job.base_score else None,
        "test_records": len(samples),
        "examples": [
            {"id": s.id, "reference": s.answer, "base": b, "expert": p}
            for s, b, p in list(zip(samples, job.base_preds, preds, strict=True))[:5]
        ],
        "lora": to_dict(job.lora),
        "train": to_dict(job.spec),
    }
    (job.out / EXPERT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    report(f"[{job.name}] {info['metric']}: base {info['base_value']} -> expert {info['value']}")
    return info
