"""All experts of loras.yaml trained together: one process, one copy of the base, one pass.

Every optimisation step builds one batch that concatenates the next micro-batch of every expert
still training, each taken from that expert's own seeded stream (the BatchStream, length grouping
included, that it would use alone) through its own loader (train/loader.py: padded ahead by loading
processes, pinned on CUDA). Each expert's loss is summed on the device and read back only at the
steps it logs (evaluations, its last step, every `log_every`). The multi-expert LoRA layers (model/multi_lora.py) apply to each
row only its expert's A/B. The loss is the sum over experts of each expert's token-mean
cross-entropy over its own rows, so each expert's gradient is exactly the one it would get alone.
Gradient clipping, AdamW, the LR schedule, evaluation (validation loss), keep-best and early
stopping are all per expert; an expert that stops (early or at its own step count) leaves the
batch. With the same seeds, data and lora dropout 0, the adapters equal those of training each
expert alone (up to float rounding); dropout > 0 draws different masks than the sequential path.

With a checkpoint folder the whole multi-expert state (every expert's weights, best weights,
optimizer, scheduler, batch-stream position, early-stopping state and log, plus the RNG) is saved
as one checkpoint (train/checkpoint.py), so `--resume` after a kill gives the same adapters bit
for bit as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LorasConfig, TrainSpec, to_dict
from ..data.preprocess import concat_batches
from ..errors import UserError
from ..hashing import sha256_stream
from ..layout import CHECKPOINTS_DIR, TENSORBOARD_DIR, TRAIN_LOG_FILE
from ..model.kernels import compile_language_model, load_training_base
from ..model.lora import attach_lora, detach_lora
from . import checkpoint as ckpt
from .expert_jobs import prepare_expert, score_and_save, score_base, train_stats
from .loader import BatchLoader, worker_count
from .loop import (
    BatchStream,
    RunLog,
    enable_gradient_checkpointing,
    eval_loss,
    example_lengths,
    lower_is_better,
    lr_lambda,
    make_optimizer,
    save_best,
)
from .loss import expert_token_means

# experts share a forward pass while padding to the longest row costs at most 25 % more tokens than
# separate passes: past that, the padded rows cost more time than the shared pass saves
# (bench/train_concurrent.py times this default against one pass for every expert)
PAD_SLACK = 0.25
# the joint checkpoints of a concurrent run: OUTPUT_DIR/.concurrent/<expert+expert+...>/step-N/
CONCURRENT_CKPT_DIR = ".concurrent"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ExpertRun:
    """One expert in a concurrent run: its data, settings and where its log goes."""

    name: str
    examples: Sequence
    val_examples: Sequence
    spec: TrainSpec
    log_dir: Path | None = None  # train_log.jsonl (+ TensorBoard events) written here when set
    on_best: Callable[[int, dict, dict], None] | None = None  # (step, metrics, weights) at each new best
    checkpoint_dir: Path | None = None  # where on_best writes: cleared by a fresh run, tidied on resume


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
    resumed_from: int = 0


def length_groups(lengths: dict[int, list[int]], slack: float) -> list[list[int]]:
    """Split experts (each with its micro-batch's sequence lengths) into forward passes.

    Rows pad to the longest row of their pass, so one short expert beside a long one pays for the
    long one's length. Experts are taken shortest first and share a pass while its padded size
    stays within (1 + slack) x what they would cost in passes of their own; slack = inf puts every
    expert in one pass. Each expert's rows always stay together (one group of the pass).
    """
    order = sorted(lengths, key=lambda e: max(lengths[e]))
    parts: list[list[int]] = []
    rows = own = 0
    for e in order:
        n, longest = len(lengths[e]), max(lengths[e])
        if parts and (rows + n) * longest <= (1 + slack) * (own + n * longest):
            parts[-1].append(e)
            rows, own = rows + n, own + n * longest
        else:
            parts.append([e])
            rows, own = n, n * longest
    return parts


def train_concurrent(
    model,
    multi,
    runs: list[ExpertRun],
    pad_id: int,
    report=print,
    pad_slack: float | None = None,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    settings: dict | None = None,
) -> ConcurrentResult:
    """Train the experts of `multi` (a MultiLora installed in `model`) together; best weights loaded at the end.

    `runs[e]` describes expert e of `multi`. Each expert follows the sequential loop's rules: its
    own AdamW over its own parameters, warmup/cosine schedule over its own step count, gradient
    clipping of its own gradient norm, validation loss at step 0 and every `eval_every` steps (and at
    its last step), keep-best, and early stopping after `patience` evaluations without improvement.
    `pad_slack` (default PAD_SLACK) bounds the padding that experts of different lengths may add by
    sharing a forward pass (`length_groups`); without LoRA dropout it changes speed only, never the
    result (with dropout, other groupings draw other dropout masks).

    With `checkpoint_dir`, one checkpoint of every expert's state is saved at each step where an
    expert reaches its `save_every` (default: its `eval_every`) or leaves, keeping the largest
    `keep_checkpoints` of the experts; `resume=True` continues from the newest one, refusing one
    made with other `settings` (the caller's description of the experts, data and base).
    """
    if multi.n != len(runs):
        raise ValueError(f"{len(runs)} runs for {multi.n} experts")
    pad_slack = PAD_SLACK if pad_slack is None else pad_slack
    run = _JointRun(model, multi, runs, pad_id, pad_slack)
    root = Path(checkpoint_dir) if checkpoint_dir else None
    first = run.start(root, resume, {**(settings or {}), "pad_slack": pad_slack}, report)
    start, step_time, step = time.perf_counter(), 0.0, first
    model.train()
    try:
        while run.active:
            step += 1
            t0 = time.perf_counter()
            totals = run.accumulate_gradients()
            run.update(step)
            logging = [e for e in run.active if _logs_at(runs[e].spec, step)]
            # the one read of the device, at steps that log (each expert's last step does): it waits
            # for the queued work, so the steps' time is right without a synchronize per step
            values = totals.tolist() if logging else []
            step_time += time.perf_counter() - t0
            leaving = run.log_and_evaluate(step, logging, values, report)
            leaving += [e for e in run.active if step == runs[e].spec.steps and e not in leaving]
            due = any(step % (runs[e].spec.save_every or runs[e].spec.eval_every) == 0 for e in run.active)
            run.active = [e for e in run.active if e not in leaving]
            for e in leaving:
                run.loaders[e].close()  # its state stays readable for the checkpoints
            if root and (due or leaving):
                run.save(root, step)
    finally:
        for loader in run.loaders.values():  # stops the loading processes, also when training is interrupted
            loader.close()
    return ConcurrentResult(run.finish(), time.perf_counter() - start, step_time, step, first)


class _JointRun:
    """The per-expert state of one train_concurrent run and the parts of its optimisation step.

    Experts are numbered as in `multi`; `active` lists those still training.
    """

    def __init__(self, model, multi, runs: list[ExpertRun], pad_id: int, pad_slack: float):
        import torch

        self.model, self.multi, self.runs, self.pad_id, self.pad_slack = model, multi, runs, pad_id, pad_slack
        # the sequential loop seeds torch at its start; only dropout draws from it
        torch.manual_seed(runs[0].spec.seed)
        self.device = next(model.parameters()).device
        if any(r.spec.gradient_checkpointing for r in runs):
            enable_gradient_checkpointing(model)
        self.params = [multi.parameters(e) for e in range(len(runs))]
        self.optims = [make_optimizer(self.params[e], r.spec, self.device) for e, r in enumerate(runs)]
        self.scheds = [
            torch.optim.lr_scheduler.LambdaLR(self.optims[e], lr_lambda(r.spec, r.spec.steps))
            for e, r in enumerate(runs)
        ]
        # each expert's stream is the one the sequential loop would draw (length grouping included)
        self.streams = [
            BatchStream(
                len(r.examples),
                r.spec.batch_size,
                r.spec.seed,
                lengths=example_lengths(r.examples) if r.spec.length_grouping else None,
                group=r.spec.length_grouping,
            )
            for r in runs
        ]
        self.better = [lower_is_better("val_loss", r.spec.min_delta) for r in runs]
        self.outcome = [ExpertOutcome() for _ in runs]
        self.logs: list = []
        self.best_state: list[dict] = []
        self.bad: list[int] = []
        self.active: list[int] = []
        self.loaders: dict[int, BatchLoader] = {}
        self.settings: dict = {}
        self.keep = max(r.spec.keep_checkpoints for r in runs)

    def evaluate(self, e: int) -> dict:
        """Expert e's validation metrics (its LoRA alone active)."""
        with self.multi.only(e):
            run = self.runs[e]
            return {"val_loss": eval_loss(self.model, run.val_examples, self.pad_id, run.spec.batch_size)}

    def start(self, root: Path | None, resume: bool, settings: dict, report) -> int:
        """Resume from the newest checkpoint under `root` or start afresh (evaluating every expert at
        step 0), then open each active expert's loader; returns the step training continues after."""
        self.settings = settings
        runs, E = self.runs, len(self.runs)
        loaded = ckpt.load_latest(root, report) if resume and root else None
        self.model.eval()
        if loaded:
            state, meta, folder = loaded
            ckpt.check_resumable(meta, settings, folder)
            self.best_state, self.bad, self.active, first = _restore(
                state, meta, self.multi, self.optims, self.scheds, self.streams, self.outcome
            )
            # purge_step drops TensorBoard events a killed run wrote after this checkpoint
            self.logs = [_run_log(r, meta["experts"][e]["log"], first + 1) for e, r in enumerate(runs)]
            for r in runs:
                if r.checkpoint_dir:
                    ckpt.remove_partial(r.checkpoint_dir)
            ckpt.remove_partial(root)
            report(f"resuming {E} experts from {folder} (step {first})")
        else:
            if resume:
                report(f"no checkpoint in {root} to resume from; starting at step 0")
            for d in [root, *(r.checkpoint_dir for r in runs)]:
                if d:  # a fresh run: an earlier run's checkpoints must not be resumed later
                    ckpt.clear_checkpoints(d)
            self.logs = [_run_log(r, [], None) for r in runs]
            self.best_state, self.bad = [], [0] * E
            for e in range(E):
                self.outcome[e].best_metrics = self.evaluate(e)
                self.best_state.append(self.multi.state(e))
                self.logs[e].record({"step": 0, **self.outcome[e].best_metrics})
            self.active, first = list(range(E)), 0
        # one loader per expert still training, over its own stream: rows padded ahead by loading
        # processes, pinned on CUDA; a loader records its stream's state after each batch it hands out
        cuda = self.device.type == "cuda"
        self.loaders = {
            e: _loader(runs[e], self.streams[e], self.pad_id, self.device.type, len(self.active), cuda)
            for e in self.active
        }
        return first

    def accumulate_gradients(self):
        """Forward and backward passes over every active expert's micro-batches of one step; returns
        each expert's loss for the step, summed on the device (read back only when it is logged)."""
        import torch

        runs, multi, device = self.runs, self.multi, self.device
        cuda = device.type == "cuda"
        for e in self.active:
            self.optims[e].zero_grad(set_to_none=True)
        totals = torch.zeros(len(runs), dtype=torch.float64, device=device)
        for micro in range(max(runs[e].spec.grad_accum for e in self.active)):
            members = [e for e in self.active if micro < runs[e].spec.grad_accum]
            got = {e: self.loaders[e].next() for e in members}
            for e in members:
                self.outcome[e].samples_seen += got[e].pop("rows")
                del got[e]["supervised"]
            # each expert's rows sit whole in one forward pass, so splitting changes no gradient
            shapes = {e: [got[e]["input_ids"].shape[1]] * len(got[e]["input_ids"]) for e in members}
            for part in length_groups(shapes, self.pad_slack):
                # labels stay on the host: the loss finds the supervised positions there
                labels = concat_batches([{"labels": got[e].pop("labels")} for e in part], self.pad_id)
                on_device = [{k: v.to(device, non_blocking=cuda) for k, v in got[e].items()} for e in part]
                batch = concat_batches(on_device, self.pad_id)
                sizes = [len(shapes[e]) for e in part]
                multi.set_groups(list(zip(part, sizes, strict=True)))
                means = expert_token_means(self.model, batch, labels["labels"], sizes)
                # built on the host and copied without waiting (torch.tensor(..., device=) would sync)
                accum = torch.tensor([float(runs[e].spec.grad_accum) for e in part])
                losses = means / accum.to(means.device, non_blocking=True)
                losses.sum().backward()
                for i, e in enumerate(part):
                    totals[e] += losses[i].detach().double()
        multi.set_groups([])
        return totals

    def update(self, step: int) -> None:
        """Each active expert's optimiser step: its own gradient clipping, AdamW and LR schedule."""
        import torch

        for e in self.active:
            spec = self.runs[e].spec
            if spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params[e], spec.max_grad_norm)
            self.optims[e].step()
            self.scheds[e].step()
            self.outcome[e].steps = step

    def log_and_evaluate(self, step: int, logging: list[int], values: list[float], report) -> list[int]:
        """Log the experts of `logging` at `step` (`values`: every expert's training loss); those due
        evaluate, keep a new best and count toward early stopping. Returns the experts that stop early."""
        leaving = []
        for e in logging:
            run = self.runs[e]
            entry = {"step": step, "train_loss": values[e], "lr": self.scheds[e].get_last_lr()[0]}
            if not (step % run.spec.eval_every == 0 or step == run.spec.steps):
                self.logs[e].record(entry)
                continue
            self.model.eval()
            metrics = self.evaluate(e)
            self.model.train()
            self.logs[e].record({**entry, **metrics})
            outcome = self.outcome[e]
            if self.better[e](metrics, outcome.best_metrics):
                outcome.best_metrics, outcome.best_step, self.bad[e] = metrics, step, 0
                self.best_state[e] = self.multi.state(e)
                if run.on_best:
                    run.on_best(step, metrics, self.best_state[e])
            else:
                self.bad[e] += 1
                if run.spec.patience and self.bad[e] >= run.spec.patience:
                    outcome.stopped_early = True
                    leaving.append(e)
                    report(f"[{run.name}] stopped early at step {step}")
        return leaving

    def save(self, root: Path, step: int) -> None:
        """One checkpoint of every expert's state (weights, best weights, optimiser, schedule, stream
        position, early-stopping state and log) plus the RNG, at `step`."""
        multi, streams, loaders = self.multi, self.streams, self.loaders
        state = {
            "experts": [
                {
                    "trainable": _plain(multi.state(e)),
                    "best": _plain(self.best_state[e]),
                    "optimizer": self.optims[e].state_dict(),
                    "scheduler": self.scheds[e].state_dict(),
                    "stream": loaders[e].state_dict() if e in loaders else streams[e].state_dict(),
                }
                for e in range(len(self.runs))
            ],
            "rng": ckpt.rng_states(),
        }
        per_expert = [
            {
                "name": r.name,
                "active": e in self.active,
                "bad_evals": self.bad[e],
                **{f.name: getattr(self.outcome[e], f.name) for f in dataclasses.fields(ExpertOutcome)},
                "log": self.logs[e].log,
            }
            for e, r in enumerate(self.runs)
        ]
        meta = {"step": step, "finished": not self.active, "settings": self.settings, "experts": per_expert}
        ckpt.save_checkpoint(root, step, state, meta, self.keep)

    def finish(self) -> list[ExpertOutcome]:
        """Load every expert's best weights back into the layers and close the logs; the outcomes."""
        self.model.eval()
        for e in range(len(self.runs)):
            self.multi.load_state(e, self.best_state[e])
            self.outcome[e].log = self.logs[e].log
            self.logs[e].close()
        return self.outcome


def _logs_at(spec: TrainSpec, step: int) -> bool:
    """Whether an expert's log gets an entry at `step`: evaluations, its last step, every log_every."""
    return (
        step % spec.eval_every == 0
        or step == spec.steps
        or bool(spec.log_every and step % spec.log_every == 0)
    )


def _loader(run: ExpertRun, stream, pad_id: int, device_type: str, experts: int, pin: bool) -> BatchLoader:
    """An expert's BatchLoader; with data_workers auto, the loading processes are shared among the experts."""
    workers = worker_count(run.spec.data_workers, device_type)
    if run.spec.data_workers is None and workers:
        workers = max(1, workers // experts)
    return BatchLoader(run.examples, stream, pad_id, 0, 1, workers, run.spec.prefetch_batches, pin=pin)


def _run_log(run: ExpertRun, log: list[dict], purge_step: int | None) -> RunLog:
    """An expert's RunLog: its train_log.jsonl and TensorBoard events in log_dir (kept in memory only without one)."""
    if not run.log_dir:
        return RunLog(None, None, True, log, purge_step)
    return RunLog(run.log_dir / TRAIN_LOG_FILE, run.log_dir / TENSORBOARD_DIR, True, log, purge_step)


def _plain(weights: dict) -> dict:
    """An expert's weights as plain tensors ({module: {"A", "B"}}), loadable with weights_only=True."""
    return {name: {"A": w.A, "B": w.B} for name, w in weights.items()}


def _restore(state: dict, meta: dict, multi, optims, scheds, streams, outcome: list[ExpertOutcome]):
    """Put every expert back as a checkpoint saved it; returns (best states, bad evals, active, step)."""
    best_state, bad, active = [], [], []
    for e, (saved, info) in enumerate(zip(state["experts"], meta["experts"], strict=True)):
        like = multi.state(e)  # scaling and dropout come from the config, the tensors from the checkpoint
        multi.load_state(e, {n: dataclasses.replace(like[n], **w) for n, w in saved["trainable"].items()})
        best_state.append({n: dataclasses.replace(like[n], **w) for n, w in saved["best"].items()})
        optims[e].load_state_dict(saved["optimizer"])
        scheds[e].load_state_dict(saved["scheduler"])
        streams[e].load_state_dict(saved["stream"])
        fields = {f.name for f in dataclasses.fields(ExpertOutcome)} - {"log"}
        outcome[e] = ExpertOutcome(**{k: info[k] for k in fields}, log=list(info["log"]))
        bad.append(info["bad_evals"])
        if info["active"]:
            active.append(e)
    ckpt.restore_rng(state["rng"])
    return best_state, bad, active, meta["step"]


def concurrent_checkpoints(output_dir: str | Path, names: list[str]) -> Path:
    """The joint checkpoint folder of a concurrent run of `names` (in this order) under output_dir.

    One folder per set of experts: the per-expert output locks that keep two runs off the same
    expert also keep them off the same folder.
    """
    key = "+".join(names)
    if not all(SAFE_NAME.match(n) for n in names) or len(key) > 120:
        # the names NUL-separated, not hashing.fingerprint: the key existing checkpoints were saved under
        key = sha256_stream(io.BytesIO("\0".join(names).encode()))[:16]
    return Path(output_dir) / CONCURRENT_CKPT_DIR / key


def best_checkpoint_writer(folder: Path, lora, base_model: str) -> Callable[[int, dict, dict], None]:
    """A callback writing each new best of one expert to `folder`/best (PEFT adapter + state.json),
    atomically, with the sequential loop's `save_best`."""
    from ..model.multi_lora import save_peft_adapter

    def write(step: int, metrics: dict, weights: dict) -> None:
        save_best(lambda tmp: save_peft_adapter(tmp, lora, weights, base_model), folder, step, metrics)

    return write


def resume_settings(cfg: LorasConfig, jobs: list, init: list[dict]) -> dict:
    """What a concurrent checkpoint must match to be resumed: the experts in order, each one's
    training settings, LoRA, data (train/val counts and identity) and parameter shapes, and the base."""
    out: dict = {"experts": [j.name for j in jobs], "base_model": cfg.base_model}
    for j, weights in zip(jobs, init, strict=True):
        own = {
            **ckpt.weight_settings(j.spec),
            "lora": to_dict(j.lora),
            "examples": [len(j.train_examples), len(j.val_examples)],
            "data": ckpt.data_identity(j.prep),
            "parameters": {n: [list(w.A.shape), list(w.B.shape)] for n, w in weights.items()},
        }
        out.update({f"{j.name}.{k}": v for k, v in own.items()})
    return out


def train_experts_concurrent(
    cfg: LorasConfig,
    names: list[str],
    device: str = "auto",
    dtype: str = "auto",
    report=print,
    resume: bool = False,
    digests: dict[str, str] | None = None,
) -> dict:
    """`mole train experts --concurrent`: every named expert trained in one pass on one base.

    Preparation, base scoring, final scoring and saving are the sequential path's own
    (train/expert_jobs.py); each expert ends as an ordinary PEFT adapter with the same metadata.
    Checkpoints go to `concurrent_checkpoints(output_dir, names)`; `resume` continues from them.
    """
    from ..model.multi_lora import MultiLora, copy_into_peft, expert_weights_from_spec

    base = load_training_base(cfg.base_model, dtype, device, cfg.kernels)
    jobs = [prepare_expert(cfg, name, (digests or {}).get(name)) for name in names]
    pads = {job.pad_id for job in jobs}
    if len(pads) != 1:
        raise UserError(f"experts {names} were preprocessed with different pad tokens {sorted(pads)}")
    for job in jobs:
        score_base(base, job, report)
    # each expert starts from exactly the weights the sequential path would give it
    init = [expert_weights_from_spec(base, job.lora, job.spec.seed) for job in jobs]
    multi = MultiLora(base, init)
    if cfg.kernels.compile:
        compile_language_model(base)
    runs = []
    for j in jobs:
        writer = best_checkpoint_writer(j.out / CHECKPOINTS_DIR, j.lora, cfg.base_model)
        runs.append(
            ExpertRun(
                j.name, j.train_examples, j.val_examples, j.spec, j.out, writer, j.out / CHECKPOINTS_DIR
            )
        )
    report(
        f"[concurrent] training {len(jobs)} experts together: "
        + ", ".join(f"{j.name} {j.spec.steps} steps x batch {j.spec.batch_size}" for j in jobs)
    )
    result = train_concurrent(
        base,
        multi,
        runs,
        pads.pop(),
        report,
        checkpoint_dir=concurrent_checkpoints(cfg.output_dir, names),
        resume=resume,
        settings=resume_settings(cfg, jobs, init),
    )
    states = [multi.state(e) for e in range(len(jobs))]
    base = multi.remove()
    results = {}
    for job, outcome, state in zip(jobs, result.experts, states, strict=True):
        model = attach_lora(base, job.lora, job.spec.seed)
        copy_into_peft(model, state)
        stats = {
            **train_stats(outcome, result.seconds),
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
