"""Training the expert LoRAs of loras.yaml, one after another on one loaded base.

Each expert: preprocess its dataset (or reuse a preprocessed folder), score the untrained base on
test records with the expert's task metric, train a LoRA (keep-best by validation loss), score
again, save an ordinary PEFT adapter plus metadata, and remove the LoRA before the next expert.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter_info import write_adapter_info
from ..config import LorasConfig, to_dict
from ..data.formats import Sample, load_expert_dataset
from ..data.preprocess import (
    check_compatible,
    code_digest,
    dataset_digest,
    fingerprint,
    is_preprocessed,
    load_preprocessed,
    preprocess_splits,
    sample_from_dict,
)
from ..errors import UserError
from ..eval.task_metrics import TASK_METRICS, score_many
from ..infer.generate import generate
from ..layout import CHECKPOINTS_DIR, EXPERT_INFO_FILE, PREPROCESS_META_FILE, TRAIN_LOG_FILE
from ..model.loading import processor_digest

DEFAULT_TASK = "text"  # records without metadata.task are scored by character similarity


def prepared_data(name: str, data: str, cache: Path, model: str, cfg: LorasConfig) -> Path:
    """A preprocessed folder for the expert: `data` itself if already preprocessed, else a cache."""
    if is_preprocessed(data):
        return Path(data)
    if not Path(data).is_dir():
        raise UserError(f"experts.{name}.data: {data} is not a dataset folder")
    splits = load_expert_dataset(data)
    for split in ("train", "val"):
        if not splits[split]:
            raise UserError(
                f"{data}: expert '{name}' has no {split} records ({split}.jsonl missing or empty)"
            )
    # the cache is reused only for the same data, processor, pixel budget and code
    source = fingerprint(
        dataset_digest(data),
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


def train_experts(
    cfg: LorasConfig, only: list[str] | None = None, device: str = "auto", dtype: str = "auto", report=print
) -> dict:
    """Train every expert of the config (or `only` those); returns {expert: result dict}."""

    from ..model.loading import load_base, load_processor
    from ..model.lora import attach_lora, detach_lora
    from .loop import eval_loss, lower_is_better, train_loop

    names = only or list(cfg.experts)
    missing = [n for n in names if n not in cfg.experts]
    if missing:
        raise UserError(f"unknown expert(s) {missing}; the config has {list(cfg.experts)}")
    if not names:
        raise UserError("the config lists no experts")
    out_root = Path(cfg.output_dir)
    base = load_base(cfg.base_model, dtype, device)
    results = {}
    for name in names:
        entry = cfg.experts[name]
        lora, spec = cfg.resolved(name)
        out = out_root / name
        prep = prepared_data(name, entry.data, out / "prep", cfg.base_model, cfg)
        meta, train = load_preprocessed(prep, "train")
        check_compatible(meta, "sft", cfg.base_model, cfg.image, prep)
        processor = load_processor(cfg.base_model, meta["min_pixels"], meta["max_pixels"])
        pad_id = processor.tokenizer.pad_token_id
        _, val = load_preprocessed(prep, "val")
        _, test = load_preprocessed(prep, "test")
        if not train["examples"] or not val["examples"]:
            raise UserError(f"{prep}: expert '{name}' needs train and val examples (keep-best reads val)")
        test_samples = [sample_from_dict(d) for d in test["samples"]]
        if cfg.eval_records:
            test_samples = test_samples[: cfg.eval_records]
        report(f"[{name}] scoring the untrained base on {len(test_samples)} test records")
        base_preds = generate(base, processor, test_samples, entry.max_new_tokens) if test_samples else []
        base_score = task_score(test_samples, base_preds) if test_samples else None

        model = attach_lora(base, lora, spec.seed)
        val_examples = val["examples"]

        def evaluate(model=model, val_examples=val_examples, spec=spec, pad_id=pad_id):
            return {"val_loss": eval_loss(model, val_examples, pad_id, spec.batch_size)}

        report(f"[{name}] training {spec.steps} steps, batch {spec.batch_size}x{spec.grad_accum}")
        out.mkdir(parents=True, exist_ok=True)
        result = train_loop(
            model,
            train["examples"],
            spec,
            pad_id,
            evaluate,
            lower_is_better("val_loss", spec.min_delta),
            out / TRAIN_LOG_FILE,
            out / CHECKPOINTS_DIR,
        )
        preds = generate(model, processor, test_samples, entry.max_new_tokens) if test_samples else []
        score = task_score(test_samples, preds) if test_samples else None
        adapter_dir = out / "adapter"
        model.save_pretrained(adapter_dir)
        write_adapter_info(
            adapter_dir,
            {
                "role": "expert",
                "expert": name,
                "base_model": cfg.base_model,
                "min_pixels": meta["min_pixels"],
                "max_pixels": meta["max_pixels"],
                "max_new_tokens": entry.max_new_tokens,
            },
        )
        info = {
            "expert": name,
            "data": entry.data,
            "adapter": str(adapter_dir),
            "steps": result.steps,
            "best_step": result.best_step,
            "best_val_loss": result.best_metrics["val_loss"],
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 2),
            "samples_per_s": round(result.samples_seen / max(result.seconds, 1e-9), 2),
            "metric": score["metric"] if score else None,
            "value": score["value"] if score else None,
            "base_value": base_score["value"] if base_score else None,
            "test_records": len(test_samples),
            "examples": [
                {"id": s.id, "reference": s.answer, "base": b, "expert": p}
                for s, b, p in list(zip(test_samples, base_preds, preds, strict=True))[:5]
            ],
            "lora": to_dict(lora),
            "train": to_dict(spec),
        }
        (out / EXPERT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        report(f"[{name}] {info['metric']}: base {info['base_value']} -> expert {info['value']}")
        results[name] = info
        base = detach_lora(model)
        del model
    return results
