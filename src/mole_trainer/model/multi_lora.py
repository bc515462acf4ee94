"""Several LoRA experts on one frozen base: a grouped multi-expert LoRA layer.

Each targeted Linear of the language model (the same `target_regex` as `model/lora.py`) is
replaced by a `MultiLoraLinear` holding the frozen base Linear plus, per expert, its own A [r, in]
and B [out, r] parameters and scaling. Before a forward pass the caller says which rows belong to
which expert (`MultiLora.set_groups`: rows grouped contiguously by expert, in order); every layer
then adds to each row only its own expert's low-rank update:

- all groups the same size, same rank and dropout: ONE grouped computation, the experts' weights
  stacked to A [E, r, in] and B [E, out, r] and the input reshaped to [E, rows*T, in] (torch.bmm);
- otherwise a loop over the experts' row segments (one matmul pair per expert, never per sample).

Each expert's weights stay separate Parameters (stacked at forward time), so each expert keeps its
own optimiser, gradient clipping and learning-rate schedule, and a row of one expert never reaches
another expert's gradients. Weights come from, and go back to, ordinary PEFT adapters: `from_peft`
reads them from a PEFT-wrapped base, `copy_into_peft` writes one expert into a PEFT wrapper for
scoring and `save_pretrained`.

The layer also serves inference over mixed batches (stacked inference): set the groups for the
batch once (rows sorted by expert) and call `generate`; every decoding step sees the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RowGroups:
    """Which expert owns which rows of the current batch: [(expert index, row count), ...] in order.

    A row count of None means "all rows" (a single-expert batch of any size).
    """

    groups: list[tuple[int, int | None]] = field(default_factory=list)


@dataclass
class ExpertWeights:
    """One expert's LoRA on one module (what PEFT stores for adapter 'default')."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float
    dropout: float


class MultiLoraLinear(nn.Module):
    """A frozen base Linear plus one optional LoRA per expert, applied per row group."""

    def __init__(self, base: nn.Linear, n_experts: int, rows: RowGroups):
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        # slot i of the lists holds expert slot_of[i]; experts that do not target this module have none
        self.slot: list[int | None] = [None] * n_experts
        self.scaling: list[float] = [0.0] * n_experts
        self.dropout: list[float] = [0.0] * n_experts

    def add_expert(self, expert: int, w: ExpertWeights) -> None:
        """Give `expert` its own trainable copy of A and B on this module."""
        dev, dtype = self.base_layer.weight.device, w.A.dtype
        self.slot[expert] = len(self.lora_A)
        self.lora_A.append(nn.Parameter(w.A.detach().clone().to(dev, dtype)))
        self.lora_B.append(nn.Parameter(w.B.detach().clone().to(dev, dtype)))
        self.scaling[expert] = w.scaling
        self.dropout[expert] = w.dropout

    def weights(self, expert: int) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(A, B) of an expert on this module, or None when the expert does not target it."""
        s = self.slot[expert]
        return None if s is None else (self.lora_A[s], self.lora_B[s])

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return nn.functional.dropout(x, p, training=self.training) if p > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        groups = self.rows.groups
        if not groups:
            return out
        n_rows = x.shape[0]
        sizes = [n_rows if n is None else n for _, n in groups]
        if sum(sizes) != n_rows:
            raise RuntimeError(f"row groups cover {sum(sizes)} rows but the batch has {n_rows}")
        experts = [e for e, _ in groups]
        lora = [self.weights(e) for e in experts]
        dtype = self.lora_A[0].dtype if len(self.lora_A) else x.dtype
        xin = x.to(dtype)
        ranks = {w[0].shape[0] for w in lora if w is not None}
        if (
            len(groups) > 1
            and all(w is not None for w in lora)
            and len(set(sizes)) == 1
            and len(ranks) == 1
            and len({self.dropout[e] for e in experts}) == 1
        ):
            # equal groups: one batched matmul pair over [E, rows_per_expert * T, in]
            E = len(groups)
            A = torch.stack([w[0] for w in lora])  # [E, r, in]
            B = torch.stack([w[1] for w in lora])  # [E, out, r]
            xe = self._drop(xin.reshape(E, -1, xin.shape[-1]), self.dropout[experts[0]])
            delta = torch.bmm(torch.bmm(xe, A.transpose(1, 2)), B.transpose(1, 2))
            # built on the host, copied without waiting: torch.tensor(..., device=cuda) syncs every layer
            scale = torch.tensor([self.scaling[e] for e in experts], dtype=delta.dtype)
            scale = scale.to(delta.device, non_blocking=True)
            delta = delta * scale.view(E, 1, 1)
            return out + delta.reshape(out.shape).to(out.dtype)
        pieces, start = [], 0
        for e, n, w in zip(experts, sizes, lora, strict=True):
            seg = out[start : start + n]
            if w is not None:
                xs = self._drop(xin[start : start + n], self.dropout[e])
                seg = seg + ((xs @ w[0].t()) @ w[1].t() * self.scaling[e]).to(out.dtype)
            pieces.append(seg)
            start += n
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers (adapter 'default') of a module tree, by module name relative to it."""
    return {
        name: m
        for name, m in module.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and "default" in m.lora_A
    }


def from_peft(peft_model) -> dict[str, ExpertWeights]:
    """One expert's LoRA weights (adapter 'default') by base-model module name, copied out."""
    out = {}
    for name, m in lora_layers(peft_model.get_base_model()).items():
        drop = m.lora_dropout["default"]
        out[name] = ExpertWeights(
            A=m.lora_A["default"].weight.detach().clone(),
            B=m.lora_B["default"].weight.detach().clone(),
            scaling=float(m.scaling["default"]),
            dropout=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
        )
    return out


def copy_into_peft(peft_model, weights: dict[str, ExpertWeights]) -> None:
    """Load one expert's weights into a PEFT wrapper built with the same LoRA spec (adapter 'default')."""
    layers = lora_layers(peft_model.get_base_model())
    if set(layers) != set(weights):
        raise ValueError(
            f"PEFT wrapper targets {len(layers)} modules, the expert has {len(weights)}: specs differ"
        )
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A["default"].weight.copy_(weights[name].A)
            m.lora_B["default"].weight.copy_(weights[name].B)


class MultiLora:
    """The multi-expert layers installed in one base model, and the row groups they share.

    `MultiLora(base, [weights of expert 0, weights of expert 1, ...])` replaces every module named
    in any expert's weights with a `MultiLoraLinear` (in place); `remove()` puts the base Linears
    back. Base parameters stay frozen; only the experts' A and B require gradients.
    """

    def __init__(self, base: nn.Module, experts: Sequence[dict[str, ExpertWeights]]):
        self.base = base
        self.n = len(experts)
        self.rows = RowGroups()
        self.layers: dict[str, MultiLoraLinear] = {}
        for p in base.parameters():
            p.requires_grad_(False)
        names = sorted({name for w in experts for name in w})
        for name in names:
            linear = base.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name} is {type(linear).__name__}, expected a Linear")
            layer = MultiLoraLinear(linear, self.n, self.rows)
            for e, w in enumerate(experts):
                if name in w:
                    layer.add_expert(e, w[name])
            base.set_submodule(name, layer)
            self.layers[name] = layer

    def set_groups(self, groups: list[tuple[int, int | None]]) -> None:
        """Rows of the next forward passes, grouped by expert in order: [(expert, count), ...]."""
        bad = [e for e, _ in groups if not 0 <= e < self.n]
        if bad:
            raise ValueError(f"expert index {bad} out of range 0..{self.n - 1}")
        self.rows.groups = list(groups)

    @contextmanager
    def only(self, expert: int):
        """Every row of the forward passes inside the block belongs to `expert`."""
        saved = self.rows.groups
        self.set_groups([(expert, None)])
        try:
            yield
        finally:
            self.rows.groups = saved

    def parameters(self, expert: int) -> list[nn.Parameter]:
        """The trainable parameters of one expert (A and B of every module it targets), in a fixed order."""
        out = []
        for layer in self.layers.values():
            w = layer.weights(expert)
            if w is not None:
                out.extend(w)
        return out

    def state(self, expert: int) -> dict[str, ExpertWeights]:
        """A detached copy of one expert's weights (for keep-best and saving)."""
        out = {}
        for name, layer in self.layers.items():
            w = layer.weights(expert)
            if w is not None:
                out[name] = ExpertWeights(
                    w[0].detach().clone(), w[1].detach().clone(), layer.scaling[expert], layer.dropout[expert]
                )
        return out

    def load_state(self, expert: int, state: dict[str, ExpertWeights]) -> None:
        """Copy saved weights back into one expert's parameters."""
        with torch.no_grad():
            for name, w in state.items():
                A, B = self.layers[name].weights(expert)
                A.copy_(w.A)
                B.copy_(w.B)

    def remove(self) -> nn.Module:
        """Put every base Linear back in place and return the base model (no trace of the experts)."""
        for name, layer in self.layers.items():
            self.base.set_submodule(name, layer.base_layer)
        self.layers = {}
        self.rows.groups = []
        return self.base


def expert_weights_from_spec(base: nn.Module, spec, seed: int) -> dict[str, ExpertWeights]:
    """The initial weights the sequential path would give an expert: attach_lora with its seed, copy, detach."""
    from .lora import attach_lora, detach_lora

    pm = attach_lora(base, spec, seed)
    weights = from_peft(pm)
    detach_lora(pm)
    return weights


def save_peft_adapter(folder, spec, weights: dict[str, ExpertWeights], base_model: str) -> None:
    """Write one expert's weights as a PEFT adapter folder without building a PEFT wrapper.

    The files are what `PeftModel.save_pretrained` writes for adapter 'default' (adapter_config.json
    from the same LoraConfig, and adapter_model.safetensors with PEFT's key names), so plain
    `PeftModel.from_pretrained` loads it; used for the best-so-far checkpoints during training.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from .lora import peft_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_config(spec, inference=True)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    tensors = {}
    for name, w in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = w.A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = w.B.detach().contiguous().cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_peft_adapter(folder, device=None) -> dict[str, ExpertWeights]:
    """One saved PEFT LoRA adapter (save_pretrained folder) as expert weights by module name.

    With it a deployment's experts can be installed side by side (`MultiLora(base, [load...])`)
    and a batch mixing experts served in one pass (stacked inference): sort the rows by expert,
    `set_groups`, then forward or generate. Only plain LoRA is read (no DoRA, rsLoRA or per-module
    rank/alpha patterns): anything else raises rather than computing a different scaling.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if cfg.get(k)]
    if cfg.get("peft_type") != "LORA" or unsupported:
        raise ValueError(
            f"{folder}: only plain LoRA adapters are supported (found {unsupported or cfg.get('peft_type')})"
        )
    tensors = load_file(str(folder / "adapter_model.safetensors"), device=str(device or "cpu"))
    prefix, out = "base_model.model.", {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(prefix) : -len(".lora_A.weight")]
        out[name] = ExpertWeights(
            A=A,
            B=tensors[key.replace(".lora_A.", ".lora_B.")],
            scaling=cfg["lora_alpha"] / cfg["r"],
            dropout=float(cfg.get("lora_dropout") or 0.0),
        )
    return out
