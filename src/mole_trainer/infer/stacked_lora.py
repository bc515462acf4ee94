"""Many LoRA adapters stacked once in one base, each row of a batch using its own (inference only).

Every Linear that any adapter targets is replaced by a `StackedLoraLinear` holding the frozen base
Linear plus the adapters' weights stacked into buffers (transposed: A [S, in, R], B [S, R, out]),
one slot per adapter, zero-padded to the largest rank R on that module (a slot whose adapter does
not target the module is all zeros, and so is the "no adapter" slot the caller may reserve).
Before a forward pass, or a whole `generate`, the caller sets which slot each row uses
(`set_rows`: the rows' weights are gathered then, once); rows keep their slot through every
decoding step, since `generate` never reorders a greedy batch.

- every row on one slot: that adapter's own unpadded A and B;
- rows on several slots: the rows' A and B are gathered and applied in ONE batched matmul pair
  (`torch.bmm`, then `baddbmm_` into the base output, over [rows, T, in]): no loop over adapters,
  whatever the grouping. The zero padding adds exact zeros, so a row's update is its adapter's.

Both paths compute (x (scaling A)^T) B^T added in place into the base output; PEFT computes the
same products in another order ((x A^T) B^T, then scaled, then added), so logits agree to rounding
and greedy tokens match (tests/unit/test_engine.py checks token equality with PEFT).

Memory: a mixed batch holds its rows' gathered weights, rows x R x sum(in + out) elements over the
stacked modules (8B shape, every projection, R = 16, 16 rows: about 1.4 GB in bf16); every row on
one slot gathers nothing.

The training-side layer (model/multi_lora.py) keeps each expert's weights as separate trainable
Parameters and stacks them at every forward; at inference nothing trains, so the stack is built once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..model.multi_lora import ExpertWeights


class StackedLoraLinear(nn.Module):
    """A frozen base Linear plus S adapters' LoRA weights stacked into buffers."""

    def __init__(self, base: nn.Linear, slots: Sequence[ExpertWeights | None]):
        super().__init__()
        self.base_layer = base
        dev, dtype = base.weight.device, base.weight.dtype
        self.ranks = [0 if w is None else int(w.A.shape[0]) for w in slots]
        rank = max(self.ranks)
        # stored transposed for x @ A_t @ B_t, the scaling folded into A (exact for alpha/r a power of 2)
        A_t = torch.zeros(len(slots), base.in_features, rank, device=dev, dtype=dtype)
        B_t = torch.zeros(len(slots), rank, base.out_features, device=dev, dtype=dtype)
        for s, w in enumerate(slots):
            if w is not None:
                r = self.ranks[s]
                A_t[s, :, :r] = (w.A.to(dev, torch.float32) * w.scaling).t().to(dtype)
                B_t[s, :r] = w.B.to(dev, dtype).t()
        self.register_buffer("A_t", A_t, persistent=False)
        self.register_buffer("B_t", B_t, persistent=False)
        self._uniform: int | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # A_t, B_t gathered per row

    def bind(self, slots: int | Sequence[int]) -> None:
        """Rows of the next forward passes: one slot for all rows, or a slot per row (gathered once
        here, not at every decoding step)."""
        if isinstance(slots, int):
            self._uniform, self._rows = slots, None
        else:
            # stacking views: CPU advanced indexing (A_t[tensor]) measured ~200x slower for these shapes
            A_rows = torch.stack([self.A_t[s] for s in slots])
            B_rows = torch.stack([self.B_t[s] for s in slots])
            self._uniform, self._rows = None, (A_rows, B_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self._uniform is None and self._rows is None:
            raise RuntimeError("stacked LoRA: no row slots set for this forward pass (set_rows first)")
        if self._uniform is not None and self.ranks[self._uniform] == 0:
            return out
        dtype = self.A_t.dtype
        if out.dtype != dtype or not out.is_contiguous():
            out = out.to(dtype).contiguous()
        xin = x.to(dtype)
        # the update is added into the base output in place (a fused multiply-add, no delta tensor)
        if self._uniform is not None:
            s, r = self._uniform, self.ranks[self._uniform]
            h = xin.reshape(-1, xin.shape[-1]) @ self.A_t[s, :, :r]
            out.view(-1, out.shape[-1]).addmm_(h, self.B_t[s, :r])
            return out.to(x.dtype)
        A_rows, B_rows = self._rows
        if A_rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"stacked LoRA: {A_rows.shape[0]} row slots for a batch of {x.shape[0]} rows")
        h = torch.bmm(xin.reshape(x.shape[0], -1, x.shape[-1]), A_rows)  # [rows, T, R]
        out.view(x.shape[0], -1, out.shape[-1]).baddbmm_(h, B_rows)
        return out.to(x.dtype)


class StackedLora:
    """Adapters stacked in one base model: `StackedLora(model, [weights or None per slot])`.

    A slot of None (or an empty dict) is "no adapter": its rows see the base model alone.
    """

    def __init__(self, model: nn.Module, slots: Sequence[dict[str, ExpertWeights] | None]):
        self.model = model
        self.n = len(slots)
        self.current: tuple[int, ...] | None = None
        self.layers: dict[str, StackedLoraLinear] = {}
        names = sorted({name for w in slots if w for name in w})
        for name in names:
            linear = model.get_submodule(name)
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
            layer = StackedLoraLinear(linear, per_slot)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    def set_rows(self, slots: Sequence[int]) -> None:
        """The slot of each row of the next forward passes (one entry per batch row, in order)."""
        slots = tuple(int(s) for s in slots)
        bad = [s for s in slots if not 0 <= s < self.n]
        if bad or not slots:
            raise ValueError(f"adapter slots {list(bad) or '[]'} out of range 0..{self.n - 1}")
        self.current = slots
        if len(set(slots)) == 1:
            for layer in self.layers.values():
                layer.bind(slots[0])
            return
        for layer in self.layers.values():
            layer.bind(slots)

    @contextmanager
    def rows_as(self, slots: Sequence[int]):
        """Set the row slots for the block, then restore the previous ones."""
        saved = self.current
        self.set_rows(slots)
        try:
            yield
        finally:
            if saved is not None:
                self.set_rows(saved)

    def remove(self) -> nn.Module:
        """Put every base Linear back and return the base model."""
        for name, layer in self.layers.items():
            self.model.set_submodule(name, layer.base_layer)
        self.layers = {}
        return self.model
