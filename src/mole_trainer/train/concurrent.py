"""All experts of loras.yaml trained together: one process, one copy of the base, one pass.

Every optimisation step builds one batch that concatenates the next micro-batch of every expert
still training, each taken from that expert's own seeded stream (`batches(n, bs, seed)`, exactly
the stream it would use alone). The multi-expert LoRA layers (model/multi_lora.py) apply to each
row only its expert's A/B. The loss is the sum over experts of each expert's token-mean
cross-entropy over its own rows, so each expert's gradient is exactly the one it would get alone.
Gradient clipping, AdamW, the LR schedule, evaluation (validation loss), keep-best and early
stopping are all per expert; an expert that stops (early or at its own step count) leaves the
batch. With the same seeds, data and lora dropout 0, the adapters equal those of training each
expert alone (up to float rounding); dropout > 0 draws different masks than the sequential path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LorasConfig, TrainSpec
from ..data.preprocess import IGNORE_INDEX, collate
from ..errors import UserError
from ..layout import TENSORBOARD_DIR, TRAIN_LOG_FILE


@dataclass
class ExpertRun:
    """One expert in a concurrent run: its data, settings and where its log goes."""

    name: str
    examples: Sequence
    val_examples: Sequence
    spec: TrainSpec
    log_dir: Path | None = None  # train_log.jsonl (+ TensorBoard events) written here when set


@dataclass
class ExpertOutcome:
    """What training produced for one expert (its best weights are loaded back into the layers)."""

    steps: int = 0
    best_step: int = 0
    best_metrics: dict = field(default_factory=dict)
    stopped_early: bool = False
    samples_seen: int = 0
    log: list[dict] = field(default_factory=list)


@dataclass
class ConcurrentResult:
    """Per-expert outcomes plus the run's timing (optimisation steps only, and in all)."""

    experts: list[ExpertOutcome]
    seconds: float
    step_seconds: float
    steps: int


def expert_token_means(logits, labels, sizes: list[int]):
    """Token-mean next-token cross-entropy of each row group (an expert's rows), in fp32: [groups]."""
    import torch
    import torch.nn.functional as F

    shift = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = F.cross_entropy(
        shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    row_sum = ce.sum(1)
    row_count = (target != IGNORE_INDEX).sum(1).to(row_sum.dtype)
    owner = torch.repeat_interleave(
        torch.arange(len(sizes), device=row_sum.device), torch.tensor(sizes, device=row_sum.device)
    )
    sums = torch.zeros(len(sizes), device=row_sum.device).index_add(0, owner, row_sum)
    counts = torch.zeros(len(sizes), device=row_sum.device).index_add(0, owner, row_count)
    return sums / counts.clamp(min=1.0)


class _Log:
    """One expert's training log: JSONL and, when available, TensorBoard scalars."""

    def __init__(self, folder: Path | None):
        self.entries: list[dict] = []
        self.path = folder / TRAIN_LOG_FILE if folder else None
        self.tb = None
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / TENSORBOARD_DIR))

    def record(self, entry: dict) -> None:
        self.entries.append(entry)
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if self.tb:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def train_concurrent(model, multi, runs: list[ExpertRun], pad_id: int, report=print) -> ConcurrentResult:
    """Train the experts of `multi` (a MultiLora installed in `model`) together; best weights loaded at the end.

    `runs[e]` describes expert e of `multi`. Each expert follows the sequential loop's rules: its
    own AdamW over its own parameters, warmup/cosine schedule over its own step count, gradient
    clipping of its own gradient norm, validation loss at step 0 and every `eval_every` steps (and at
    its last step), keep-best, and early stopping after `patience` evaluations without improvement.
    """
    import torch

    from .loop import batches, eval_loss, lower_is_better, lr_lambda

    E = len(runs)
    if multi.n != E:
        raise ValueError(f"{E} runs for {multi.n} experts")
    # the sequential loop seeds torch at its start; only dropout draws from it
    torch.manual_seed(runs[0].spec.seed)
    device = next(model.parameters()).device
    if any(getattr(r.spec, "gradient_checkpointing", False) for r in runs):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = [multi.parameters(e) for e in range(E)]
    optims = [
        torch.optim.AdamW(params[e], lr=r.spec.lr, weight_decay=r.spec.weight_decay)
        for e, r in enumerate(runs)
    ]
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(optims[e], lr_lambda(r.spec, r.spec.steps))
        for e, r in enumerate(runs)
    ]
    streams = [batches(len(r.examples), r.spec.batch_size, r.spec.seed) for r in runs]
    better = [lower_is_better("val_loss", r.spec.min_delta) for r in runs]
    logs = [_Log(r.log_dir) for r in runs]
    outcome = [ExpertOutcome() for _ in runs]

    def evaluate(e: int) -> dict:
        with multi.only(e):
            return {"val_loss": eval_loss(model, runs[e].val_examples, pad_id, runs[e].spec.batch_size)}

    model.eval()
    best_state, bad = [], [0] * E
    for e in range(E):
        outcome[e].best_metrics = evaluate(e)
        best_state.append(multi.state(e))
        logs[e].record({"step": 0, **outcome[e].best_metrics})

    active = list(range(E))
    start, step_time, step = time.perf_counter(), 0.0, 0
    model.train()
    while active:
        step += 1
        t0 = time.perf_counter()
        for e in active:
            optims[e].zero_grad(set_to_none=True)
        totals = dict.fromkeys(active, 0.0)
        for micro in range(max(runs[e].spec.grad_accum for e in active)):
            members = [e for e in active if micro < runs[e].spec.grad_accum]
            idx = {e: next(streams[e]) for e in members}
            rows = [runs[e].examples[i] for e in members for i in idx[e]]
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            labels = batch.pop("labels")
            sizes = [len(idx[e]) for e in members]
            multi.set_groups(list(zip(members, sizes, strict=True)))
            means = expert_token_means(model(**batch).logits, labels, sizes)
            accum = torch.tensor([float(runs[e].spec.grad_accum) for e in members], device=means.device)
            losses = means / accum
            losses.sum().backward()
            for e, value in zip(members, losses.tolist(), strict=True):
                totals[e] += value
                outcome[e].samples_seen += len(idx[e])
        multi.set_groups([])
        for e in active:
            if runs[e].spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params[e], runs[e].spec.max_grad_norm)
            optims[e].step()
            scheds[e].step()
            outcome[e].steps = step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time += time.perf_counter() - t0
        leaving = []
        for e in active:
            spec = runs[e].spec
            last = step == spec.steps
            if step % spec.eval_every == 0 or last:
                model.eval()
                metrics = evaluate(e)
                model.train()
                logs[e].record(
                    {"step": step, "train_loss": totals[e], "lr": scheds[e].get_last_lr()[0], **metrics}
                )
                if better[e](metrics, outcome[e].best_metrics):
                    outcome[e].best_metrics, outcome[e].best_step, bad[e] = metrics, step, 0
                    best_state[e] = multi.state(e)
                else:
                    bad[e] += 1
                    if spec.patience and bad[e] >= spec.patience:
                        outcome[e].stopped_early = True
                        leaving.append(e)
                        report(f"[{runs[e].name}] stopped early at step {step}")
                        continue
            if last:
                leaving.append(e)
        active = [e for e in active if e not in leaving]
    model.eval()
    for e in range(E):
        multi.load_state(e, best_state[e])
        outcome[e].log = logs[e].entries
        logs[e].close()
    return ConcurrentResult(outcome, time.perf_counter() - start, step_time, step)


def train_experts_concurrent(
    cfg: LorasConfig, names: list[str], device: str = "auto", dtype: str = "auto", report=print
) -> dict:
    """`mole train experts --concurrent`: every named expert trained in one pass on one base.

    Preparation, base scoring, final scoring and saving are the sequential path's own
    (train/experts.py); each expert ends as an ordinary PEFT adapter with the same metadata.
    """
    from ..model.loading import load_base
    from ..model.lora import attach_lora, detach_lora
    from ..model.multi_lora import MultiLora, copy_into_peft, expert_weights_from_spec
    from .experts import prepare_expert, score_and_save, score_base

    base = load_base(cfg.base_model, dtype, device)
    jobs = [prepare_expert(cfg, name) for name in names]
    pads = {job.pad_id for job in jobs}
    if len(pads) != 1:
        raise UserError(f"experts {names} were preprocessed with different pad tokens {sorted(pads)}")
    for job in jobs:
        score_base(base, job, report)
    # each expert starts from exactly the weights the sequential path would give it
    init = [expert_weights_from_spec(base, job.lora, job.spec.seed) for job in jobs]
    multi = MultiLora(base, init)
    runs = [ExpertRun(j.name, j.train_examples, j.val_examples, j.spec, j.out) for j in jobs]
    report(
        f"[concurrent] training {len(jobs)} experts together: "
        + ", ".join(f"{j.name} {j.spec.steps} steps x batch {j.spec.batch_size}" for j in jobs)
    )
    result = train_concurrent(base, multi, runs, pads.pop(), report)
    states = [multi.state(e) for e in range(len(jobs))]
    base = multi.remove()
    results = {}
    for job, outcome, state in zip(jobs, result.experts, states, strict=True):
        model = attach_lora(base, job.lora, job.spec.seed)
        copy_into_peft(model, state)
        stats = {
            "steps": outcome.steps,
            "best_step": outcome.best_step,
            "best_val_loss": outcome.best_metrics["val_loss"],
            "stopped_early": outcome.stopped_early,
            # wall time of the shared run (all experts together), and this expert's share of samples
            "train_seconds": round(result.seconds, 2),
            "samples_per_s": round(outcome.samples_seen / max(result.seconds, 1e-9), 2),
            "concurrent": {
                "experts": names,
                "samples_per_s_all": round(
                    sum(o.samples_seen for o in result.experts) / max(result.seconds, 1e-9), 2
                ),
            },
        }
        results[job.name] = score_and_save(model, job, cfg, stats, report)
        base = detach_lora(model)
        del model
    return results
