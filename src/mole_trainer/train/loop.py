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

from ..atomic import replace_folder
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


@dataclass
class _Progress:
    """Where a run stands besides its weights: what a checkpoint's trainer_state records about it."""

    best_state: dict  # the trainable parameters at the best evaluation so far
    best_metrics: dict
    best_step: int = 0
    bad_evals: int = 0  # evaluations in a row without a new best (early-stopping patience)
    stopped: bool = False
    finished: bool = False
    seen: int = 0  # training rows drawn so far
    start: int = 0  # the step this call began after (0, or the checkpoint resumed from)

    @classmethod
    def resumed(cls, best_state: dict, meta: dict) -> _Progress:
        """The progress a checkpoint's trainer_state recorded."""
        keys = ("best_metrics", "best_step", "bad_evals", "stopped", "finished", "seen")
        return cls(best_state, **{k: meta[k] for k in keys}, start=meta["step"])

    def trainer_state(self, step: int, done: bool, settings: dict, log: list[dict]) -> dict:
        """The trainer_state.json of a checkpoint taken after `step`."""
        return {
            "step": step,
            "seen": self.seen,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
            "bad_evals": self.bad_evals,
            "stopped": self.stopped,
            "finished": done,
            "settings": settings,
            "log": log,
        }


class _Optimisation:
    """The trainable parameters of a model with their optimiser, schedule, batch stream and loss.

    Built in a fixed order after the caller seeds torch, so a resumed run draws what an uninterrupted
    one would. Under torchrun the loss module is wrapped in DDP and each rank loads its share of a batch.
    """

    def __init__(self, model, examples, spec: TrainSpec, pad_id: int, dist, sample_weights):
        import torch

        self.model, self.examples, self.spec, self.pad_id, self.dist = model, examples, spec, pad_id, dist
        self.device = next(model.parameters()).device
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        if spec.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.optim = make_optimizer(self.params, spec, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lr_lambda(spec, spec.steps))
        lengths = example_lengths(examples) if spec.length_grouping else None
        self.stream = BatchStream(
            len(examples), spec.batch_size, spec.seed, sample_weights, lengths, spec.length_grouping
        )
        self.net = loss_module(model)
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # no device_ids: DDP would copy the inputs to the GPU, labels too, which stay on the host
            self.net = DistributedDataParallel(self.net)
        self.loader: BatchLoader | None = None

    def snapshot(self) -> dict:
        """A copy of the trainable parameters."""
        return {n: p.detach().clone() for n, p in self.named.items()}

    def load_weights(self, values: dict) -> None:
        """Copy saved values into the trainable parameters."""
        import torch

        with torch.no_grad():
            for n, value in values.items():
                self.named[n].copy_(value)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state: weights, optimiser, schedule, stream position and RNGs."""
        self.load_weights(state["trainable"])
        self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        ckpt.restore_rng(state["rng"])

    def state(self, best_state: dict) -> dict:
        """What a checkpoint's state.pt holds (the stream position is the loader's when one runs)."""
        return {
            "trainable": self.snapshot(),
            "best": best_state,
            "optimizer": self.optim.state_dict(),
            "scheduler": self.sched.state_dict(),
            "stream": self.loader.state_dict() if self.loader else self.stream.state_dict(),
            "rng": ckpt.rng_states(),
        }

    def open_loader(self) -> None:
        """Start the batch loader (and its loading processes, if any)."""
        workers = worker_count(self.spec.data_workers, self.device.type)
        self.loader = BatchLoader(
            self.examples,
            self.stream,
            self.pad_id,
            self.dist.rank,
            self.dist.world,
            workers,
            self.spec.prefetch_batches,
            pin=self.device.type == "cuda",
        )

    def step(self):
        """One optimiser step over `grad_accum` micro-batches: (the step's loss as a device tensor, rows).

        The loss is summed on the device: reading it back would make the host wait for the GPU.
        """
        import torch

        spec, world, cuda = self.spec, self.dist.world, self.device.type == "cuda"
        self.optim.zero_grad(set_to_none=True)
        total, rows = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for micro in range(spec.grad_accum):
            batch = self.loader.next()
            rows += batch.pop("rows")
            denom = self._global_tokens(batch.pop("supervised")) * spec.grad_accum
            labels = batch.pop("labels")  # stays on the host: the loss finds the answer positions there
            batch = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.items()}
            sync = world == 1 or micro == spec.grad_accum - 1
            with self.net.no_sync() if not sync else nullcontext():
                # DDP averages gradients over ranks; scaling by world keeps the global token mean
                scale = world / denom
                loss = self.net(batch, labels) * (scale if world == 1 else scale.float())
                loss.backward()
            total += loss.detach().double() / world
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, spec.max_grad_norm)
        self.optim.step()
        self.sched.step()
        return total, rows

    def _global_tokens(self, count: int):
        """Supervised positions of the whole global batch: a number, or a device tensor under torchrun
        (summed on the device, so the host never waits for it)."""
        if self.dist.world == 1:
            return max(float(count), 1.0)
        import torch
        import torch.distributed as tdist

        t = torch.tensor(float(count), dtype=torch.float64).to(self.device, non_blocking=True)
        tdist.all_reduce(t)
        return t.clamp(min=1.0)

    def mean_loss(self, total) -> float:
        """The step's loss over all ranks, read back to the host (a GPU sync: only at log steps)."""
        if self.dist.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(total)
        return total.item()


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
    settings, base model), so a checkpoint is never resumed onto other data or another adapter.
    `sample_weights` switches to weighted sampling with replacement.
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
    opt = _Optimisation(model, examples, spec, pad_id, dist, sample_weights)
    settings = _resume_settings(spec, len(examples), data_id, sample_weights is not None, opt.named, identity)
    run = _Run(opt, Path(checkpoint_dir) if checkpoint_dir else None, settings, evaluate, better)
    run.begin(resume, log_path, tensorboard_dir, report)
    return run.train()


def _resume_settings(spec, n_examples: int, data_id, weighted: bool, named: dict, identity) -> dict:
    """What a checkpoint must have been made with for this run to resume from it."""
    settings = {
        **ckpt.weight_settings(spec),
        "examples": n_examples,
        "data": data_id,
        "weighted": weighted,
        "parameters": {n: list(p.shape) for n, p in named.items()},
        **(identity or {}),
    }
    if not spec.length_grouping:
        del settings["length_grouping"]  # so checkpoints written before the option existed still resume
    return settings


class _Run:
    """One call of `train_loop`: steps, evaluations, keep-best, early stopping, log and checkpoints."""

    def __init__(self, opt: _Optimisation, root: Path | None, settings: dict, evaluate, better):
        self.opt, self.spec, self.dist = opt, opt.spec, opt.dist
        self.root, self.settings, self.evaluate, self.better = root, settings, evaluate, better
        self.progress: _Progress | None = None  # set by begin()
        self.writer: RunLog | None = None

    def begin(self, resume: bool, log_path, tensorboard_dir, report) -> None:
        """Restore the newest checkpoint (with `resume`), or clear the folder and evaluate the start."""
        root, main = self.root, self.dist.main
        loaded = ckpt.load_latest(root, report) if resume else None
        if loaded:
            state, meta, folder = loaded
            ckpt.check_resumable(meta, self.settings, folder)
            self.opt.restore(state)
            self.progress = _Progress.resumed(state["best"], meta)
            self.writer = RunLog(log_path, tensorboard_dir, main, meta["log"], meta["step"] + 1)
            if main:
                ckpt.remove_partial(root)
            report(f"resuming from {folder} (step {meta['step']} of {self.spec.steps})")
            return
        if resume:
            report(f"no checkpoint in {root} to resume from; starting at step 0")
        if root and main:
            ckpt.clear_checkpoints(root)
        self.writer = RunLog(log_path, tensorboard_dir, main, [], None)
        metrics = self.evaluate()
        self.progress = _Progress(self.opt.snapshot(), metrics)
        self.writer.record({"step": 0, **metrics})

    def train(self) -> TrainResult:
        """Run the remaining steps; returns with the best weights loaded into the model."""
        progress, spec, model = self.progress, self.spec, self.opt.model
        last = progress.start if progress.finished else spec.steps
        if progress.start < last:
            self.opt.open_loader()
        t0, step = time.perf_counter(), progress.start
        model.train()
        try:
            for step in range(progress.start + 1, last + 1):
                total, rows = self.opt.step()
                progress.seen += rows
                self._log(step, total)
                done = progress.stopped or step == spec.steps
                if self.root and (done or step % (spec.save_every or spec.eval_every) == 0):
                    self._save(step, done)
                if progress.stopped:
                    break
        finally:
            if self.opt.loader:  # stops the loading processes, also when training is interrupted
                self.opt.loader.close()
        model.eval()
        self.writer.close()
        self.opt.load_weights(progress.best_state)
        seconds = time.perf_counter() - t0
        return TrainResult(
            step,
            progress.best_step,
            progress.best_metrics,
            progress.stopped,
            seconds,
            progress.seen,
            self.writer.log,
            progress.start,
        )

    def _log(self, step: int, total) -> None:
        """At an evaluation or a `log_every` step: log the loss (and metrics), keep a new best."""
        spec, progress, model = self.spec, self.progress, self.opt.model
        evaluating = step % spec.eval_every == 0 or step == spec.steps
        if not (evaluating or (spec.log_every and step % spec.log_every == 0)):
            return
        if evaluating:
            model.eval()
            metrics = self.evaluate()
            model.train()
        entry = {"step": step, "train_loss": self.opt.mean_loss(total), "lr": self.opt.sched.get_last_lr()[0]}
        if not evaluating:
            self.writer.record(entry)
            return
        self.writer.record({**entry, **metrics})
        if self.better(metrics, progress.best_metrics):
            progress.best_metrics, progress.best_state = metrics, self.opt.snapshot()
            progress.best_step, progress.bad_evals = step, 0
            if self.root and self.dist.main:
                save_best(model.save_pretrained, self.root, step, metrics)
        else:
            progress.bad_evals += 1
            progress.stopped = bool(spec.patience and progress.bad_evals >= spec.patience)

    def _save(self, step: int, done: bool) -> None:
        """A resumable checkpoint after `step` (rank 0 writes it; every rank waits for it)."""
        if self.dist.main:
            state = self.opt.state(self.progress.best_state)
            meta = self.progress.trainer_state(step, done, self.settings, self.writer.log)
            ckpt.save_checkpoint(self.root, step, state, meta, self.spec.keep_checkpoints)
        barrier(self.dist)


def save_best(write_adapter: Callable[[Path], None], checkpoint_dir: Path, step: int, metrics: dict) -> None:
    """Write the best adapter (`write_adapter(folder)`) to checkpoint_dir/best via a temporary folder.

    The previous best is moved aside before the new one is renamed into place and removed after,
    so a kill at any moment leaves a complete adapter in `best/` or in `.best.old/` (which
    `checkpoint.remove_partial` puts back); durable like a checkpoint, so a power cut cannot leave
    `best/` with empty files.
    """
    tmp = checkpoint_dir / ckpt.BEST_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2) + "\n")
    replace_folder(tmp, checkpoint_dir / ckpt.BEST_DIR, checkpoint_dir / ckpt.BEST_OLD, durable=True)


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
