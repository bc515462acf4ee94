"""Training the router: a LoRA on the base that answers the expert's label after the router prompt.

The data is a preprocessed router dataset (task 'router'); the label map travels with it and is
written beside the adapter. Keep-best selects on validation routing accuracy (label scoring, as at
inference), ties broken by validation loss. Both come from one scoring pass over the validation
prompts (one prefill per request, logits at the label positions only): the loss is the mean negative
log-probability per token of the true label, i.e. the teacher-forced loss of the validation examples,
without a full-vocabulary tensor over every prompt position.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter_info import write_adapter_info
from ..config import RouterConfig, to_dict
from ..data.preprocess import check_compatible, load_preprocessed, sample_from_dict
from ..errors import UserError
from ..layout import CHECKPOINTS_DIR, LABEL_MAP_FILE, ROUTER_INFO_FILE, TENSORBOARD_DIR, TRAIN_LOG_FILE
from ..router_prompt import ROUTER_PROMPT_VERSION, label_names


def class_weights(experts: list[str]) -> list[float]:
    """Per-record sampling weights that give every expert the same expected share of a batch."""
    from collections import Counter

    counts = Counter(experts)
    return [1.0 / counts[e] for e in experts]


def train_router(
    dataset_path: str | Path,
    cfg: RouterConfig,
    device: str = "auto",
    dtype: str = "auto",
    report=print,
    resume: bool = False,
    data_id: str | None = None,
) -> dict:
    """Train the router adapter on a preprocessed router dataset; returns the run summary.

    With `resume`, training continues from the newest checkpoint under the output folder.
    Under torchrun the ranks share each batch and only rank 0 writes files. `data_id` is the
    dataset's data_identity when the caller has it already (not computed again).
    """
    from ..model.kernels import compile_language_model, load_training_base
    from ..model.loading import load_processor, resolve_device
    from ..model.lora import attach_lora
    from .checkpoint import data_identity
    from .distributed import init_distributed
    from .loop import higher_is_better, train_loop

    meta, train, val = _load_router_data(dataset_path, cfg)
    label_map, spec = meta["label_map"], cfg.train
    names = label_names(label_map)
    processor = load_processor(cfg.base_model, meta["min_pixels"], meta["max_pixels"])
    pad_id = processor.tokenizer.pad_token_id
    dist, device = init_distributed(resolve_device(device))
    model = attach_lora(load_training_base(cfg.base_model, dtype, device, cfg.kernels), cfg.lora, spec.seed)
    if cfg.kernels.compile:
        compile_language_model(model)
    evaluate = _routing_evaluator(model, processor, val["samples"], label_map, names, cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = class_weights([d["expert"] for d in train["samples"]]) if cfg.class_balanced else None
    report(
        f"[router] training {spec.steps} steps on {len(train['examples'])} examples, {len(names)} experts"
        + (f", {dist.world} processes" if dist.world > 1 else "")
    )
    result = train_loop(
        model,
        train["examples"],
        spec,
        pad_id,
        evaluate,
        higher_is_better("val_accuracy", spec.min_delta, tie_key="val_loss"),
        out / TRAIN_LOG_FILE,
        out / CHECKPOINTS_DIR,
        resume=resume,
        tensorboard_dir=out / TENSORBOARD_DIR,
        sample_weights=weights,
        data_id=data_id or data_identity(dataset_path),
        identity={"lora": to_dict(cfg.lora), "base_model": cfg.base_model},
        report=report,
    )
    adapter_dir = out / "adapter"
    info = _run_summary(result, adapter_dir, label_map, cfg, dataset_path, dist.world)
    if not dist.main:
        return info
    _write_router(model, adapter_dir, out / ROUTER_INFO_FILE, info, meta, cfg.base_model)
    report(f"[router] best val accuracy {result.best_metrics['val_accuracy']:.3f} at step {result.best_step}")
    return info


def _load_router_data(dataset_path: str | Path, cfg: RouterConfig) -> tuple[dict, dict, dict]:
    """(meta, train split, val split) of a preprocessed router dataset made for this base and image size."""
    meta, train = load_preprocessed(dataset_path, "train")
    check_compatible(meta, "router", cfg.base_model, cfg.image, dataset_path)
    _, val = load_preprocessed(dataset_path, "val")
    if not train["examples"] or not val["examples"]:
        raise UserError(f"{dataset_path}: the router needs train and val examples")
    return meta, train, val


def _routing_evaluator(model, processor, val_records: list[dict], label_map: dict, names: list[str], cfg):
    """evaluate() for keep-best: validation loss and routing accuracy by label scoring, as at inference.

    The prompts are encoded once: the processor would otherwise re-run on every validation image at
    every evaluation.
    """
    from ..eval.metrics import accuracy
    from ..infer.scoring import encode_router_prompts, encoded_scores, label_loss, label_token_ids

    samples = [sample_from_dict(d) for d in val_records]
    if cfg.eval_max_records:
        samples = samples[: cfg.eval_max_records]
    labels = [label_map[s.expert] for s in samples]
    prompts = encode_router_prompts(processor, samples, names)
    label_ids = label_token_ids(processor.tokenizer, names)
    pad_id, batch_size = processor.tokenizer.pad_token_id, cfg.train.batch_size

    def evaluate() -> dict:
        scores = encoded_scores(model, prompts, label_ids, pad_id, batch_size)
        return {
            "val_loss": label_loss(scores, labels, label_ids),
            "val_accuracy": accuracy(scores.softmax(-1).numpy(), labels),
        }

    return evaluate


def _run_summary(result, adapter_dir: Path, label_map: dict, cfg: RouterConfig, dataset_path, world: int):
    """The router_info.json of a finished run."""
    return {
        "adapter": str(adapter_dir),
        "label_map": label_map,
        "steps": result.steps,
        "best_step": result.best_step,
        "best": result.best_metrics,
        "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
        "train_seconds": round(result.seconds, 2),
        "samples_per_s": round(result.samples_seen / max(result.seconds, 1e-9), 2),
        "processes": world,
        "lora": to_dict(cfg.lora),
        "train": to_dict(cfg.train),
        "class_balanced": cfg.class_balanced,
        "dataset": str(dataset_path),
    }


def _write_router(model, adapter_dir: Path, info_file: Path, info: dict, meta: dict, base_model: str) -> None:
    """The trained adapter with its label map and adapter info, and the run summary (router_info.json)."""
    label_map = info["label_map"]
    model.save_pretrained(adapter_dir)
    (adapter_dir / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")
    write_adapter_info(
        adapter_dir,
        {
            "role": "router",
            "prompt_version": ROUTER_PROMPT_VERSION,
            "base_model": base_model,
            "label_map": label_map,
            "min_pixels": meta["min_pixels"],
            "max_pixels": meta["max_pixels"],
        },
    )
    info_file.write_text(json.dumps(info, indent=2) + "\n")
