"""The training loop shared by experts and router.

Gradient accumulation, warmup + cosine or constant schedule, gradient clipping, evaluation every
N optimiser steps, early stopping (patience, min delta) and keep-best on a chosen metric. Only the
trainable (LoRA) parameters are optimised; the best ones are kept in memory and restored at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainSpec
from ..data.preprocess import IGNORE_INDEX, collate


@dataclass
class TrainResult:
    """What a training run produced: steps done, the best evaluation and the log."""

    steps: int
    best_step: int
    best_metrics: dict
    stopped_early: bool
    seconds: float
    samples_seen: int
    log: list[dict] = field(default_factory=list)


def lr_lambda(spec: TrainSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warmup then cosine decay or constant."""
    warmup = int(round(spec.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def batches(n: int, batch_size: int, seed: int):
    """Endless stream of index batches: a fresh seeded permutation per epoch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def train_loop(
    model,
    examples: list[dict],
    spec: TrainSpec,
    pad_id: int,
    evaluate: Callable[[], dict],
    better: Callable[[dict, dict], bool],
    log_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters on `examples`; returns with the best weights loaded.

    `evaluate()` returns a metrics dict; `better(new, best)` says whether `new` beats `best` by
    more than the configured min delta. With `checkpoint_dir`, each new best is also saved there
    (`best/`, a PEFT adapter plus `state.json`), so a crashed run leaves its best weights on disk.
    """
    import torch

    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(spec, spec.steps))
    stream = batches(len(examples), spec.batch_size, spec.seed)
    log: list[dict] = []
    if log_path:
        Path(log_path).write_text("")

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def record(entry: dict):
        log.append(entry)
        if log_path:
            with Path(log_path).open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    best_metrics = evaluate()
    best_state, best_step, bad_evals, stopped = snapshot(), 0, 0, False
    record({"step": 0, **best_metrics})
    start, seen, step = time.perf_counter(), 0, 0
    model.train()
    for step in range(1, spec.steps + 1):
        optim.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(spec.grad_accum):
            idx = next(stream)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss / spec.grad_accum
            loss.backward()
            total += loss.item()
            seen += len(idx)
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optim.step()
        sched.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            model.eval()
            metrics = evaluate()
            model.train()
            record({"step": step, "train_loss": total, "lr": sched.get_last_lr()[0], **metrics})
            if better(metrics, best_metrics):
                best_metrics, best_state, best_step, bad_evals = metrics, snapshot(), step, 0
                if checkpoint_dir:
                    save_best(model, Path(checkpoint_dir), step, metrics)
            else:
                bad_evals += 1
                if spec.patience and bad_evals >= spec.patience:
                    stopped = True
                    break
    model.eval()
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, value in best_state.items():
            named[n].copy_(value)
    return TrainResult(step, best_step, best_metrics, stopped, time.perf_counter() - start, seen, log)


def save_best(model, checkpoint_dir: Path, step: int, metrics: dict) -> None:
    """Write the adapter to checkpoint_dir/best via a temporary folder and a rename."""
    import shutil

    tmp, final = checkpoint_dir / "best.tmp", checkpoint_dir / "best"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def lower_is_better(key: str, min_delta: float) -> Callable[[dict, dict], bool]:
    """Comparator for keep-best on a metric where lower wins (e.g. validation loss)."""
    return lambda new, best: new[key] < best[key] - min_delta


def higher_is_better(key: str, min_delta: float, tie_key: str | None = None) -> Callable[[dict, dict], bool]:
    """Comparator where higher wins; on an exact tie, a lower `tie_key` (e.g. loss) wins."""

    def f(new: dict, best: dict) -> bool:
        if new[key] > best[key] + min_delta:
            return True
        return tie_key is not None and new[key] == best[key] and new[tie_key] < best[tie_key] - min_delta

    return f


def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean per-token loss over examples (no gradients)."""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n
            tokens += n
    return total / max(tokens, 1)
