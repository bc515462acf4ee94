"""Training the expert LoRAs of loras.yaml, one after another on one loaded base.

Each expert: preprocess its dataset (or reuse a preprocessed folder), score the untrained base on
test records with the expert's task metric, train a LoRA (keep-best by validation loss), score
again, save an ordinary PEFT adapter plus metadata, and remove the LoRA before the next expert.
`concurrent=True` trains all of them in one pass instead (train/concurrent.py); both paths share
the per-expert preparation, base scoring, final scoring and saving of train/expert_jobs.py.
"""

from __future__ import annotations

from ..config import LorasConfig, to_dict
from ..errors import UserError
from ..layout import CHECKPOINTS_DIR, TENSORBOARD_DIR, TRAIN_LOG_FILE
from ..model.kernels import compile_language_model, load_training_base
from ..model.loading import resolve_device
from ..model.lora import attach_lora, detach_lora
from .checkpoint import data_identity
from .concurrent import train_experts_concurrent
from .distributed import init_distributed
from .expert_jobs import expert_names, prepare_expert, score_and_save, score_base, train_stats
from .loop import eval_loss, lower_is_better, train_loop


def train_experts(
    cfg: LorasConfig,
    only: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    report=print,
    resume: bool = False,
    concurrent: bool = False,
    digests: dict[str, str] | None = None,
) -> dict:
    """Train every expert of the config (or `only` those); returns {expert: result dict}.

    `digests`: each expert's data digest when the caller has computed them (stages.input_digest).

    Under torchrun the ranks share each batch; rank 0 alone scores, saves and returns results.

    With `resume`, each expert continues from the newest checkpoint in its output folder (an
    expert whose run had finished is restored from its final checkpoint without training).
    With `concurrent`, all experts train together in one pass over one base (train/concurrent.py);
    `resume` then continues from the joint checkpoint of that set of experts.
    """
    names = expert_names(cfg, only)
    dist, device = init_distributed(resolve_device(device))
    if concurrent:
        if dist.world > 1:
            raise UserError("--concurrent runs in one process; under torchrun train the experts without it")
        return train_experts_concurrent(cfg, names, device, dtype, report, resume, digests)

    base = load_training_base(cfg.base_model, dtype, device, cfg.kernels)
    results = {}
    for name in names:
        job = prepare_expert(cfg, name, (digests or {}).get(name))
        if dist.main:  # generation-based scoring and saving happen once, on rank 0
            score_base(base, job, report)
        spec = job.spec
        model = attach_lora(base, job.lora, spec.seed)
        if cfg.kernels.compile:
            compile_language_model(model)

        def evaluate(model=model, job=job):
            return {"val_loss": eval_loss(model, job.val_examples, job.pad_id, job.spec.batch_size)}

        report(f"[{name}] training {spec.steps} steps, batch {spec.batch_size}x{spec.grad_accum}")
        job.out.mkdir(parents=True, exist_ok=True)
        result = train_loop(
            model,
            job.train_examples,
            spec,
            job.pad_id,
            evaluate,
            lower_is_better("val_loss", spec.min_delta),
            job.out / TRAIN_LOG_FILE,
            job.out / CHECKPOINTS_DIR,
            resume=resume,
            tensorboard_dir=job.out / TENSORBOARD_DIR,
            data_id=data_identity(job.prep),
            identity={"lora": to_dict(job.lora), "base_model": cfg.base_model},
            report=report,
        )
        stats = train_stats(result, result.seconds)
        if dist.world > 1:
            stats["processes"] = dist.world
        if dist.main:  # the other ranks of a torchrun return nothing: rank 0 reports for all
            results[name] = score_and_save(model, job, cfg, stats, report)
        base = detach_lora(model)
        del model
    return results
