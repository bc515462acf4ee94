"""The training loop shared by experts and router.

Gradient accumulation, warmup + cosine or constant schedule, gradient clipping, evaluation every
N optimiser steps, early stopping (patience, min delta) and keep-best on a chosen metric. Only the
trainable (LoRA) parameters are optimised; the best ones are kept in memory and restored at the end.
With a checkpoint folder it also writes resumable checkpoints (train/checkpoint.py) and resumes
exactly from the newest one; under torchrun it trains data-parallel (train/distributed.py).

Built to keep a GPU busy: the loss is the answer-only one (train/loss.py), AdamW is the fused
kernel on CUDA, batches are padded ahead by loading processes (train/loader.py) and copied from
pinned memory, and the host reads the loss back only when it logs (evaluations, every `log_every`
steps); token counts for the normalisation are taken on the host, before the batch goes to the GPU.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainSpec
from ..data.preprocess import collate
from ..errors import UserError
from . import checkpoint as ckpt
from .distributed import barrier, current
from .loader import BatchLoader, worker_count
from .loss import answer_loss_sum, loss_module, supervised_count


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
    resumed_from: int = 0


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


class BatchStream:
    """Endless seeded stream of index batches whose position can be saved and restored exactly.

    Without weights: a fresh permutation per epoch, cut into full batches (the tail of an epoch
    that does not fill a batch is skipped). With per-example weights: each batch is drawn with
    replacement in proportion to them (class-balanced sampling). With `lengths` and `group` k >= 2
    (length grouping), each run of k batches' worth of indices is sorted by length, longest first,
    before it is cut into batches, so rows of similar length share a batch and pad less; every
    epoch still covers each index once (with weights, k batches are drawn at once and sorted).
    """

    def __init__(self, n: int, batch_size: int, seed: int, weights=None, lengths=None, group: int = 0):
        import torch

        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.lengths = list(lengths) if lengths is not None and group >= 2 else None
        self.group = group if self.lengths is not None else 0
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self):
        return self

    def _by_length(self, order: list[int]) -> list[int]:
        run = self.group * self.batch_size
        out = []
        for i in range(0, len(order), run):
            out += sorted(order[i : i + run], key=lambda j: -self.lengths[j])  # stable: ties keep their order
        return out

    def __next__(self) -> list[int]:
        import torch

        if self.weights is not None:
            if not self.group:
                return torch.multinomial(self.weights, self.batch_size, True, generator=self.gen).tolist()
            if self.pos >= len(self.order):
                drawn = torch.multinomial(
                    self.weights, self.group * self.batch_size, True, generator=self.gen
                )
                self.order, self.pos = self._by_length(drawn.tolist()), 0
        else:
            stop = self.n - self.batch_size + 1 if self.n >= self.batch_size else 1
            if not self.order or self.pos >= stop:
                order = torch.randperm(self.n, generator=self.gen).tolist()
                self.order, self.pos = self._by_length(order) if self.group else order, 0
        out = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict:
        """Generator state and position within the current epoch."""
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict` was taken."""
        self.gen.set_state(state["gen"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


def batches(n: int, batch_size: int, seed: int) -> BatchStream:
    """Endless stream of index batches: a fresh seeded permutation per epoch."""
    return BatchStream(n, batch_size, seed)


def make_optimizer(params, spec: TrainSpec, device):
    """AdamW: the fused kernel on CUDA (one launch per step), the multi-tensor one elsewhere.

    On the CPU the multi-tensor AdamW gives bit-identical weights to torch's default loop (checked in
    tests); the fused CPU kernel would not.
    """
    import torch

    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **kind)


def example_lengths(examples) -> list[int]:
    """Token count of every example (its own `lengths()` when the container has one: no pixels read)."""
    own = getattr(examples, "lengths", None)
    return list(own()) if callable(own) else [len(examples[i]["input_ids"]) for i in range(len(examples))]


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of storing them (less memory, more compute)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


class RunLog:
    """The run's log: in memory, as JSONL, and as TensorBoard scalars (rank 0 writes files)."""

    def __init__(self, log_path, tensorboard_dir, main: bool, log: list[dict], purge_step: int | None):
        self.log, self.path, self.tb = log, Path(log_path) if log_path and main else None, None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(e) + "\n" for e in log))
        if tensorboard_dir and main:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is None:  # a fresh run: an earlier run's curves must not mix with this one's
                shutil.rmtree(tensorboard_dir, ignore_errors=True)

            # purge_step drops events a killed run wrote after the checkpoint we resume from
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def record(self, entry: dict) -> None:
        """Append one entry (a dict with 'step') everywhere the log goes."""
        self.log.append(entry)
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if self.tb:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, entry["step"])
            self.tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.tb:
            self.tb.close()


def train_loop(
    model,
    examples: list[dict],
    spec: TrainSpec,
    pad_id: int,
    evaluate: Callable[[], dict],
    better: Callable[[dict, dict], bool],
    log_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    resume: bool = False,
    tensorboard_dir: str | Path | None = None,
    sample_weights=None,
    data_id: str | None = None,
    identity: dict | None = None,
    report=print,
) -> TrainResult:
    """Train `model`'s trainable parameters on `examples`; returns with the best weights loaded.

    `evaluate()` returns a metrics dict; `better(new, best)` says whether `new` beats `best` by
    more than the configured min delta. With `checkpoint_dir`, each new best is saved there as a
    PEFT adapter (`best/`), and a resumable checkpoint every `spec.save_every` steps (default: at
    every evaluation); `resume=True` continues from the newest one, giving the same weights as an
    uninterrupted run; `data_id` names the training data and `identity` the rest of the run (LoRA
    settings, base model), so a checkpoint is never resumed onto other data or another adapter. `sample_weights` switches to weighted sampling with replacement.
    Under torchrun each rank takes its share of every global batch; the loss is normalised by the
    global number of supervised tokens, so the update equals one process on the whole batch.
    """
    import torch

    dist = current()
    if dist.world > 1 and spec.batch_size % dist.world:
        raise UserError(f"train.batch_size {spec.batch_size} must be divisible by the {dist.world} processes")
    if resume and not checkpoint_dir:
        raise UserError("--resume needs a checkpoint folder")
    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optim = make_optimizer(params, spec, device)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(spec, spec.steps))
    lengths = example_lengths(examples) if spec.length_grouping else None
    stream = BatchStream(
        len(examples), spec.batch_size, spec.seed, sample_weights, lengths, spec.length_grouping
    )
    net = loss_module(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # no device_ids: DDP would copy the inputs to the GPU, labels too, which stay on the host
        net = DistributedDataParallel(net)
    settings = {
        **ckpt.weight_settings(spec),
        "examples": len(examples),
        "data": data_id,
        "weighted": sample_weights is not None,
        "parameters": {n: list(p.shape) for n, p in named.items()},
        **(identity or {}),
    }
    if not spec.length_grouping:
        del settings["length_grouping"]  # so checkpoints written before the option existed still resume
    root = Path(checkpoint_dir) if checkpoint_dir else None
    save_every = spec.save_every or spec.eval_every

    def snapshot():
        return {n: p.detach().clone() for n, p in named.items()}

    loaded = ckpt.load_latest(root, report) if resume else None
    if loaded:
        state, meta, folder = loaded
        ckpt.check_resumable(meta, settings, folder)
        with torch.no_grad():
            for n, value in state["trainable"].items():
                named[n].copy_(value)
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        ckpt.restore_rng(state["rng"])
        best_state = state["best"]
        best_metrics, best_step, bad_evals = meta["best_metrics"], meta["best_step"], meta["bad_evals"]
        stopped, finished, seen, start = meta["stopped"], meta["finished"], meta["seen"], meta["step"]
        writer = RunLog(log_path, tensorboard_dir, dist.main, meta["log"], start + 1)
        if dist.main:
            ckpt.remove_partial(root)
        report(f"resuming from {folder} (step {start} of {spec.steps})")
    else:
        if resume:
            report(f"no checkpoint in {root} to resume from; starting at step 0")
        if root and dist.main:
            ckpt.clear_checkpoints(root)
        writer = RunLog(log_path, tensorboard_dir, dist.main, [], None)
        best_metrics = evaluate()
        best_state, best_step, bad_evals, stopped, finished, seen, start = (
            snapshot(),
            0,
            0,
            False,
            False,
            0,
            0,
        )
        writer.record({"step": 0, **best_metrics})

    cuda = device.type == "cuda"
    loader = None
    if not finished and start < spec.steps:
        workers = worker_count(spec.data_workers, device.type)
        loader = BatchLoader(
            examples, stream, pad_id, dist.rank, dist.world, workers, spec.prefetch_batches, pin=cuda
        )

    def save(step: int, done: bool) -> None:
        if dist.main:
            state = {
                "trainable": snapshot(),
                "best": best_state,
                "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(),
                "stream": loader.state_dict() if loader else stream.state_dict(),
                "rng": ckpt.rng_states(),
            }
            meta = {
                "step": step,
                "seen": seen,
                "best_step": best_step,
                "best_metrics": best_metrics,
                "bad_evals": bad_evals,
                "stopped": stopped,
                "finished": done,
                "settings": settings,
                "log": writer.log,
            }
            ckpt.save_checkpoint(root, step, state, meta, spec.keep_checkpoints)
        barrier(dist)

    def global_tokens(count: int):
        """Supervised positions of the whole global batch: a number, or a device tensor under torchrun
        (summed on the device, so the host never waits for it)."""
        if dist.world == 1:
            return max(float(count), 1.0)
        import torch.distributed as tdist

        t = torch.tensor(float(count), dtype=torch.float64).to(device, non_blocking=True)
        tdist.all_reduce(t)
        return t.clamp(min=1.0)

    t0, step = time.perf_counter(), start
    model.train()
    try:
        for step in range(start + 1, spec.steps + 1 if not finished else start + 1):
            optim.zero_grad(set_to_none=True)
            # the step's loss is summed on the device: reading it back would wait for the GPU
            total = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(spec.grad_accum):
                batch = loader.next()
                seen += batch.pop("rows")
                denom = global_tokens(batch.pop("supervised")) * spec.grad_accum
                labels = batch.pop("labels")  # stays on the host: the loss finds the answer positions there
                batch = {k: v.to(device, non_blocking=cuda) for k, v in batch.items()}
                sync = dist.world == 1 or micro == spec.grad_accum - 1
                with net.no_sync() if not sync else nullcontext():
                    # DDP averages gradients over ranks; scaling by world keeps the global token mean
                    scale = dist.world / denom
                    loss = net(batch, labels) * (scale if dist.world == 1 else scale.float())
                    loss.backward()
                total += loss.detach().double() / dist.world
            if spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optim.step()
            sched.step()
            evaluating = step % spec.eval_every == 0 or step == spec.steps
            if evaluating or (spec.log_every and step % spec.log_every == 0):
                if evaluating:
                    model.eval()
                    metrics = evaluate()
                    model.train()
                if dist.world > 1:
                    import torch.distributed as tdist

                    tdist.all_reduce(total)
                entry = {"step": step, "train_loss": total.item(), "lr": sched.get_last_lr()[0]}
                if evaluating:
                    writer.record({**entry, **metrics})
                    if better(metrics, best_metrics):
                        best_metrics, best_state, best_step, bad_evals = metrics, snapshot(), step, 0
                        if root and dist.main:
                            save_best(model.save_pretrained, root, step, metrics)
                    else:
                        bad_evals += 1
                        stopped = bool(spec.patience and bad_evals >= spec.patience)
                else:
                    writer.record(entry)
            done = stopped or step == spec.steps
            if root and (done or step % save_every == 0):
                save(step, done)
            if stopped:
                break
    finally:
        if loader:  # stops the loading processes, also when training is interrupted
            loader.close()
    model.eval()
    writer.close()
    with torch.no_grad():
        for n, value in best_state.items():
            named[n].copy_(value)
    return TrainResult(
        step, best_step, best_metrics, stopped, time.perf_counter() - t0, seen, writer.log, start
    )


def save_best(write_adapter: Callable[[Path], None], checkpoint_dir: Path, step: int, metrics: dict) -> None:
    """Write the best adapter (`write_adapter(folder)`) to checkpoint_dir/best via a temporary folder.

    The previous best is moved aside before the new one is renamed into place and removed after,
    so a kill at any moment leaves a complete adapter in `best/` or in `.best.old/` (which
    `checkpoint.remove_partial` puts back).
    """
    tmp, final = checkpoint_dir / ckpt.BEST_TMP, checkpoint_dir / ckpt.BEST_DIR
    old = checkpoint_dir / ckpt.BEST_OLD
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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


def eval_loss(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean per-token answer loss over examples (no gradients)."""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], pad_id)
            labels = batch.pop("labels")
            total += answer_loss_sum(model, {k: v.to(device) for k, v in batch.items()}, labels).item()
            tokens += supervised_count(labels)
    return total / max(tokens, 1)
