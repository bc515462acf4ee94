"""Typed configs for every stage, loaded strictly from YAML or JSON.

Unknown keys and wrong types are user errors that name the file and the dotted key. Relative paths
inside a config file resolve against the folder of that file, so a config works from any CWD.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.rewrites import REWRITES
from .errors import UserError

# The language-model projections of Qwen3-VL; the regex below keeps LoRA off the vision tower,
# whose layers are named attn.qkv / attn.proj / linear_fc1/2 and would match a bare "proj".
LM_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA hyper-parameters of one adapter."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LM_TARGET_MODULES))

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {}
        if self.rank < 1:
            out["rank"] = "must be >= 1"
        if not 0 <= self.dropout < 1:
            out["dropout"] = "must be in [0, 1)"
        unknown = [t for t in self.targets if t not in LM_TARGET_MODULES]
        if unknown or not self.targets:
            out["targets"] = f"unknown module(s) {unknown or '[]'}; choose from {LM_TARGET_MODULES}"
        return out


@dataclass
class TrainSpec:
    """Optimisation settings shared by the expert and router training loops."""

    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 25
    patience: int = 0  # evaluations without improvement before stopping; 0 disables
    min_delta: float = 0.0
    seed: int = 0
    save_every: int = 0  # optimiser steps between resumable checkpoints; 0 = at every evaluation
    keep_checkpoints: int = 2  # newest resumable checkpoints kept (the best adapter is kept apart)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    log_every: int = 0  # steps between train-loss log entries besides the evaluations; 0 = evaluations only
    data_workers: int | None = None  # batch-loading processes; None = 4 on CUDA, 0 (in process) on the CPU
    prefetch_batches: int = 2  # batches each loading process prepares ahead
    length_grouping: int = 0  # k >= 2: batches cut from runs of k batches sorted by length; 0 = off

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {
            k: "must be >= 1"
            for k in (
                "steps",
                "batch_size",
                "grad_accum",
                "eval_every",
                "keep_checkpoints",
                "prefetch_batches",
            )
            if getattr(self, k) < 1
        }
        if self.log_every < 0:
            out["log_every"] = "must be >= 0 (0 = log at evaluations only)"
        if self.data_workers is not None and self.data_workers < 0:
            out["data_workers"] = "must be >= 0 (0 = load batches in the training process), or null for auto"
        if self.length_grouping < 0 or self.length_grouping == 1:
            out["length_grouping"] = "must be 0 (off) or >= 2 (batches per length-sorted run)"
        if self.lr <= 0:
            out["lr"] = "must be > 0"
        if not 0 <= self.warmup_ratio < 1:
            out["warmup_ratio"] = "must be in [0, 1)"
        if self.schedule not in ("cosine", "constant"):
            out["schedule"] = "must be 'cosine' or 'constant'"
        if self.patience < 0:
            out["patience"] = "must be >= 0"
        if self.save_every < 0:
            out["save_every"] = "must be >= 0 (0 = at every evaluation)"
        return out


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class KernelSpec:
    """How the base model computes (speed only): attention kernel, liger-kernel, torch.compile.

    The defaults are the reference path; the others change results only by float rounding.
    """

    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn and CUDA)
    liger: bool = False  # liger-kernel's RMSNorm, SwiGLU and RoPE for Qwen3-VL (CUDA; the gpu extra)
    compile: bool = False  # torch.compile each language-model decoder layer (first steps pay the compile)

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            choices = ", ".join(ATTN_IMPLEMENTATIONS)
            return {"attn_implementation": f"must be one of {choices}, got {self.attn_implementation!r}"}
        return {}


@dataclass
class ImageSpec:
    """Pixel budget of preprocessing; stored with the data and the adapter, so inference uses it too."""

    min_pixels: int = 64 * 64
    max_pixels: int = 448 * 448

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            return {"max_pixels": "min_pixels must be >= 1 and max_pixels >= min_pixels"}
        return {}


@dataclass
class ExpertEntry:
    """One expert of loras.yaml: where its data is, plus per-expert overrides of the defaults."""

    data: str = ""
    lora: LoraSpec | None = None
    train: TrainSpec | None = None
    max_new_tokens: int = 48


@dataclass
class LorasConfig:
    """loras.yaml: the base model, shared defaults and one entry per expert."""

    base_model: str = ""
    output_dir: str = "checkpoints/experts"
    image: ImageSpec = field(default_factory=ImageSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    experts: dict[str, ExpertEntry] = field(default_factory=dict)
    eval_records: int = 32  # test records per expert for the task metric (0 = all)
    kernels: KernelSpec = field(default_factory=KernelSpec)  # one base for all experts: one setting

    @staticmethod
    def inherit(raw: dict) -> dict:
        """Per-expert `lora`/`train` mappings override single keys of the file's defaults."""
        experts = raw.get("experts")
        if not isinstance(experts, dict):
            return raw
        out = dict(raw, experts=dict(experts))
        for name, entry in experts.items():
            if not isinstance(entry, dict):
                continue
            entry = dict(entry)
            for key in ("lora", "train"):
                if isinstance(entry.get(key), dict) and isinstance(raw.get(key, {}), dict):
                    entry[key] = {**raw.get(key, {}), **entry[key]}
            out["experts"][name] = entry
        return out

    def resolved(self, name: str) -> tuple[LoraSpec, TrainSpec]:
        """The LoRA and training settings of one expert (its overrides on top of the defaults)."""
        entry = self.experts[name]
        return entry.lora or self.lora, entry.train or self.train


@dataclass
class RouterConfig:
    """router.yaml: the router adapter and how to train it."""

    base_model: str = ""
    output_dir: str = "checkpoints/router"
    image: ImageSpec = field(default_factory=ImageSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval_max_records: int = 0  # validation records scored at each evaluation (0 = all)
    class_balanced: bool = False  # sample training records in inverse proportion to their expert's count
    kernels: KernelSpec = field(default_factory=KernelSpec)


ROUTING_STRATEGIES = ("balanced", "proportional")
DEFAULT_TRAIN_PER_EXPERT = 100  # the equal share of the balanced strategy when not given
DEFAULT_VAL_PER_EXPERT = 16  # when neither val_per_expert nor val_fraction is given


@dataclass
class ExpertSource:
    """One expert dataset feeding the routing dataset, with an optional train target.

    `target` asks for that many train records; `weight` scales the strategy's share (the equal
    share under `balanced`, the expert's own available records under `proportional`).
    """

    path: str = ""
    target: int | None = None
    weight: float | None = None

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {}
        if self.target is not None and self.weight is not None:
            out["target"] = "give either target (a count) or weight (a factor), not both"
        elif self.target is not None and self.target < 1:
            out["target"] = "must be >= 1"
        elif self.weight is not None and self.weight <= 0:
            out["weight"] = "must be > 0"
        return out


@dataclass
class AugmentSpec:
    """Benign rewrites of train instructions (data/rewrites.py) added as extra routing records.

    Each of a seeded `fraction` of every expert's train records gets `copies` rewritten copies
    (same images, same expert, train split only); each copy applies a random non-empty subset of
    `rewrites`. `seed` defaults to the dataset's seed.
    """

    copies: int = 0  # rewritten copies per chosen train record; 0 = off
    fraction: float = 1.0  # share of the train records that get copies
    rewrites: list[str] = field(default_factory=lambda: list(REWRITES))
    seed: int | None = None

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {}
        if self.copies < 0:
            out["copies"] = "must be >= 0 (0 = no augmentation)"
        if not 0 < self.fraction <= 1:
            out["fraction"] = "must be in (0, 1]"
        unknown = [r for r in self.rewrites if r not in REWRITES]
        if unknown or not self.rewrites or len(set(self.rewrites)) != len(self.rewrites):
            out["rewrites"] = (
                f"expected distinct names from {', '.join(REWRITES)}, got {self.rewrites or '[]'}"
            )
        return out


@dataclass
class DatasetConfig:
    """dataset.yaml: which expert datasets make the routing dataset and how it is split.

    Test and val records are taken per expert first (`test_per_expert`, then `val_per_expert`
    records or `val_fraction` of what is left); the train split then follows `strategy`:
    `balanced` gives every expert `train_per_expert` records (times its weight, or its own
    target), `proportional` keeps each expert's available records (times its weight, or its
    target). `max_records_per_expert` caps every expert's train records; `oversample` repeats
    train records (seeded) to reach a target that the data cannot fill; `augment` adds rewritten
    copies of train records (AugmentSpec).
    """

    experts: dict[str, ExpertSource] = field(default_factory=dict)
    strategy: str = "balanced"
    train_per_expert: int | None = None
    max_records_per_expert: int | None = None
    oversample: bool = False
    val_per_expert: int | None = None
    val_fraction: float | None = None
    test_per_expert: int = 24
    seed: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {f"augment.{k}": v for k, v in self.augment.problems().items()}
        if self.strategy not in ROUTING_STRATEGIES:
            out["strategy"] = f"must be one of {', '.join(ROUTING_STRATEGIES)}, got {self.strategy!r}"
        elif self.strategy == "proportional" and self.train_per_expert is not None:
            out["train_per_expert"] = (
                "applies to strategy 'balanced' only; cap 'proportional' with max_records_per_expert"
            )
        if self.train_per_expert is not None and self.train_per_expert < 1:
            out["train_per_expert"] = "must be >= 1"
        if self.max_records_per_expert is not None and self.max_records_per_expert < 1:
            out["max_records_per_expert"] = "must be >= 1"
        if self.val_per_expert is not None and self.val_fraction is not None:
            out["val_fraction"] = "give either val_per_expert (a count) or val_fraction, not both"
        elif self.val_per_expert is not None and self.val_per_expert < 0:
            out["val_per_expert"] = "must be >= 0"
        elif self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            out["val_fraction"] = "must be in [0, 1)"
        if self.test_per_expert < 0:
            out["test_per_expert"] = "must be >= 0"
        return out

    def train_share(self) -> int:
        """The equal per-expert train share of the balanced strategy."""
        return DEFAULT_TRAIN_PER_EXPERT if self.train_per_expert is None else self.train_per_expert

    def val_wanted(self, pool: int) -> int:
        """Val records wanted for an expert with `pool` records left once its test records are taken."""
        if self.val_fraction is not None:
            return int(self.val_fraction * pool + 0.5)
        return DEFAULT_VAL_PER_EXPERT if self.val_per_expert is None else self.val_per_expert


MODAL_MAX_TIMEOUT_S = 24 * 3600  # Modal's limit on a function's timeout
MODAL_MAX_RETRIES = 10  # Modal's limit on modal.Retries(max_retries=...)
NO_GPU = "none"  # gpu: none runs a stage on CPUs only


@dataclass
class StageResources:
    """Resources of one Modal stage function; a key left out keeps the app's default for that stage."""

    gpu: str | None = None  # a Modal GPU type (H100, H200, A100-80GB, L40S, ...) or "none"
    gpu_count: int | None = None
    timeout_s: int | None = None
    retries: int | None = None  # attempts after a failure (pre-emption, crash); config errors never retry

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {}
        if self.gpu is not None and (not self.gpu.strip() or ":" in self.gpu):
            out["gpu"] = f"expected a GPU type such as H100, or '{NO_GPU}'; the count goes in gpu_count"
        if self.gpu_count is not None and self.gpu_count < 1:
            out["gpu_count"] = "must be >= 1"
        if self.timeout_s is not None and not 1 <= self.timeout_s <= MODAL_MAX_TIMEOUT_S:
            out["timeout_s"] = f"must be between 1 and {MODAL_MAX_TIMEOUT_S} (Modal's 24 h)"
        if self.retries is not None and not 0 <= self.retries <= MODAL_MAX_RETRIES:
            out["retries"] = f"must be between 0 and {MODAL_MAX_RETRIES}"
        return out


@dataclass
class ModalConfig:
    """modal.yaml: per-stage resources of the Modal app, e.g. `stages: {train_router: {gpu: H200}}`."""

    stages: dict[str, StageResources] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# strict loading


def load_config(path: str | Path, cls: type) -> Any:
    """Load a YAML/JSON file into the dataclass `cls`, resolving relative paths against its folder."""
    path = Path(path)
    cfg = from_dict(cls, _read_raw(path), source=str(path))
    return resolve_paths(cfg, path.parent)


def load_model_config(path: str | Path) -> LorasConfig | RouterConfig:
    """A loras.yaml or a router.yaml (both name a base model and a pixel budget), told apart by its keys.

    A file with a key only loras.yaml has (`experts`, `eval_records`) is read as loras.yaml, one
    with a key only router.yaml has as router.yaml; either way strictly, so typos are still errors.
    """
    path = Path(path)
    raw = _read_raw(path)
    own = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (LorasConfig, RouterConfig)}
    keys = set(raw) if isinstance(raw, dict) else set()
    loras_only = sorted(keys & (own[LorasConfig] - own[RouterConfig]))
    router_only = sorted(keys & (own[RouterConfig] - own[LorasConfig]))
    if loras_only and router_only:
        raise UserError(
            f"{path}: mixes loras.yaml keys ({', '.join(loras_only)}) and router.yaml keys "
            f"({', '.join(router_only)}); expected one or the other"
        )
    return load_config(path, LorasConfig if loras_only else RouterConfig)


def _read_raw(path: Path) -> Any:
    """The parsed content of a YAML/JSON config file ({} for an empty one)."""
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # parser errors carry their own line numbers
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return {} if raw is None else raw


def from_dict(cls: type, data: Any, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix or 'top level'}: expected a mapping, got {_kind(data)}")
    if hasattr(cls, "inherit"):
        data = cls.inherit(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise UserError(f"{source}: unknown key '{dotted}'{hint}")
        kwargs[key] = _convert(hints[key], value, source, dotted)
    obj = cls(**kwargs)
    problems = obj.problems() if hasattr(obj, "problems") else {}
    if problems:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"{source}: " + "; ".join(f"{where}{key}: {msg}" for key, msg in problems.items()))
    return obj


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, source, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {_kind(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {_kind(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key}: expected true or false, got {_kind(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key}: expected an integer, got {_kind(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            # YAML reads 1e-3 (no dot) as a string; accept numeric strings for floats only
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise UserError(f"{source}: {key}: expected a number, got {_kind(value)} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: {key}: expected a string, got {_kind(value)} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in our dataclasses, not user input


# keys holding filesystem paths, resolved relative to the config file
_PATH_KEYS = {"base_model", "output_dir", "data", "path"}


def resolve_paths(cfg: Any, base: Path) -> Any:
    """Make the path-valued fields of a loaded config absolute, relative to `base`.

    base_model stays as written when it does not exist locally and looks like a hub id (org/name).
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolve_paths(value, base)
        elif isinstance(value, dict):
            for v in value.values():
                if dataclasses.is_dataclass(v):
                    resolve_paths(v, base)
        elif f.name in _PATH_KEYS and isinstance(value, str) and value:
            setattr(cfg, f.name, resolve_path(value, base, allow_hub_id=f.name == "base_model"))
    return cfg


def resolve_path(value: str, base: Path, allow_hub_id: bool = False) -> str:
    """Resolve one config path; keep hub ids like 'Qwen/Qwen3-VL-8B-Instruct' untouched."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base / p).resolve()
    if allow_hub_id and not candidate.exists() and looks_like_hub_id(value):
        return value
    return str(candidate)


def looks_like_hub_id(value: str) -> bool:
    """True for 'org/name' strings that are not local-looking paths."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~"))


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config (for run records and hashing)."""
    return dataclasses.asdict(cfg)
