"""Many LoRA adapters stacked once in one base, each row of a batch using its own (inference only).

Every Linear that any adapter targets is replaced by a `StackedLoraLinear` holding the frozen base
Linear plus the adapters' weights stacked into buffers: A [S, R, in] and B [S, out, R], one slot
per adapter, zero-padded to the largest rank R on that module (a slot whose adapter does not
target the module is all zeros, and so is the "no adapter" slot the caller may reserve). Before a
forward pass, or a whole `generate`, the caller sets which slot each row uses (`set_rows`); rows
keep their slot through every decoding step, since `generate` never reorders a greedy batch.

- every row on one slot: that adapter's own unpadded A and B (the same products PEFT computes);
- rows on several slots: the rows' A and B are gathered and applied in ONE batched matmul pair
  (`torch.bmm` over [rows, T, in]): no loop over adapters, whatever the grouping. The zero padding
  adds exact zeros, so a row's update is its adapter's update.

The training-side layer (model/multi_lora.py) keeps each expert's weights as separate trainable
Parameters and stacks them at every forward; at inference nothing trains, so the stack is built once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..model.multi_lora import ExpertWeights


class RowSlots:
    """The adapter slot of every row of the current batch, shared by all stacked layers."""

    def __init__(self) -> None:
        self.uniform: int | None = None  # every row on this slot
        self.index: torch.Tensor | None = None  # [rows] slot per row (mixed batch)


class StackedLoraLinear(nn.Module):
    """A frozen base Linear plus S adapters' LoRA weights stacked into buffers."""

    def __init__(self, base: nn.Linear, slots: Sequence[ExpertWeights | None], rows: RowSlots):
        super().__init__()
        self.base_layer = base
        self.rows = rows
        dev, dtype = base.weight.device, base.weight.dtype
        self.ranks = [0 if w is None else int(w.A.shape[0]) for w in slots]
        rank = max(self.ranks)
        A = torch.zeros(len(slots), rank, base.in_features, device=dev, dtype=dtype)
        B = torch.zeros(len(slots), base.out_features, rank, device=dev, dtype=dtype)
        for s, w in enumerate(slots):
            if w is not None:
                r = self.ranks[s]
                A[s, :r] = w.A.to(dev, dtype)
                B[s, :, :r] = w.B.to(dev, dtype)
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer(
            "scale",
            torch.tensor([0.0 if w is None else w.scaling for w in slots], device=dev, dtype=dtype),
            persistent=False,
        )
        self.scaling = [0.0 if w is None else float(w.scaling) for w in slots]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self.rows
        if rows.uniform is not None:
            s = rows.uniform
            r = self.ranks[s]
            if r == 0:
                return out
            xin = x.to(self.A.dtype)
            return out + ((xin @ self.A[s, :r].t()) @ self.B[s, :, :r].t() * self.scaling[s]).to(out.dtype)
        if rows.index is None:
            raise RuntimeError("stacked LoRA: no row slots set for this forward pass (set_rows first)")
        idx = rows.index
        if idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"stacked LoRA: {idx.shape[0]} row slots for a batch of {x.shape[0]} rows")
        xin = x.to(self.A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # [rows, T, in]
        h = torch.bmm(xin, self.A[idx].transpose(1, 2))  # [rows, T, R]
        delta = torch.bmm(h, self.B[idx].transpose(1, 2)) * self.scale[idx].view(-1, 1, 1)
        return out + delta.reshape(out.shape).to(out.dtype)


class StackedLora:
    """Adapters stacked in one base model: `StackedLora(model, [weights or None per slot])`.

    A slot of None (or an empty dict) is "no adapter": its rows see the base model alone.
    """

    def __init__(self, model: nn.Module, slots: Sequence[dict[str, ExpertWeights] | None]):
        self.model = model
        self.n = len(slots)
        self.rows = RowSlots()
        self.layers: dict[str, StackedLoraLinear] = {}
        names = sorted({name for w in slots if w for name in w})
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name} is {type(linear).__name__}, expected a Linear")
            per_slot = [w.get(name) if w else None for w in slots]
            for s, w in enumerate(per_slot):
                if w is not None and (
                    w.A.shape[1] != linear.in_features or w.B.shape[0] != linear.out_features
                ):
                    raise ValueError(
                        f"adapter slot {s}: {name} has A {tuple(w.A.shape)} and B {tuple(w.B.shape)}, "
                        f"but the base Linear is {linear.in_features} -> {linear.out_features}"
                    )
            layer = StackedLoraLinear(linear, per_slot, self.rows)
            setattr(parent, child, layer)
            self.layers[name] = layer

    def set_rows(self, slots: Sequence[int]) -> None:
        """The slot of each row of the next forward passes (one entry per batch row, in order)."""
        bad = [s for s in slots if not 0 <= s < self.n]
        if bad:
            raise ValueError(f"adapter slots {bad} out of range 0..{self.n - 1}")
        if len(set(slots)) == 1:
            self.use(slots[0])
            return
        device = next(iter(self.layers.values())).A.device if self.layers else "cpu"
        self.rows.uniform = None
        self.rows.index = torch.tensor(list(slots), dtype=torch.long, device=device)

    def use(self, slot: int) -> None:
        """Every row of the next forward passes uses `slot` (any batch size)."""
        if not 0 <= slot < self.n:
            raise ValueError(f"adapter slot {slot} out of range 0..{self.n - 1}")
        self.rows.uniform, self.rows.index = slot, None

    @contextmanager
    def rows_as(self, slots: Sequence[int]):
        """Set the row slots for the block, then restore the previous ones."""
        saved = (self.rows.uniform, self.rows.index)
        self.set_rows(slots)
        try:
            yield
        finally:
            self.rows.uniform, self.rows.index = saved

    def remove(self) -> nn.Module:
        """Put every base Linear back and return the base model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base_layer)
        self.layers = {}
        return self.model
