"""Faster kernels for training a base (config `kernels:`): attention implementation, liger-kernel, compile.

Each is checked before the base is loaded, so a missing package or a CPU-only machine is a clear
config error, not a failure minutes into a run.
"""

from __future__ import annotations

import importlib.util

from ..config import KernelSpec
from ..errors import UserError

GPU_EXTRA_HINT = "pip install 'mole-trainer[gpu]'"


def check_kernels(spec: KernelSpec, device: str) -> None:
    """Raise UserError when a requested kernel cannot run here (package missing, or no CUDA)."""
    cuda = device.startswith("cuda")
    if spec.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "kernels.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation), or use sdpa"
            )
        if not cuda:
            raise UserError("kernels.attn_implementation: flash_attention_2 runs on CUDA only; use sdpa here")
    if spec.liger:
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError(
                f"kernels.liger: liger-kernel is not installed ({GPU_EXTRA_HINT}), or set it false"
            )
        if not cuda:
            raise UserError(
                "kernels.liger: liger-kernel's Triton kernels run on CUDA only; set it false here"
            )


def apply_liger(model) -> None:
    """Swap Qwen3-VL's RMSNorm, SwiGLU MLP and RoPE for liger-kernel's fused ones, in this model.

    Its cross-entropy stays off: the answer-only loss (train/loss.py) already runs the output head
    at the supervised positions alone, which is the memory that fused linear cross-entropy saves.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl

    apply_liger_kernel_to_qwen3_vl(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )


def load_training_base(path_or_hub_id: str, dtype: str, device: str, spec: KernelSpec):
    """The base model for training, with the configured attention and (if asked) liger-kernel."""
    from .loading import load_base, resolve_device

    device = resolve_device(device)
    check_kernels(spec, device)
    model = load_base(path_or_hub_id, dtype, device, attn=spec.attn_implementation)
    if spec.liger:
        apply_liger(model)
    return model


def decoder_layers(model) -> list:
    """The language model's decoder layers (inside a PEFT wrapper or not)."""
    from ..train.loss import causal_lm

    lm = causal_lm(model)
    language_model = getattr(getattr(lm, "model", None), "language_model", None)
    if language_model is None or not hasattr(language_model, "layers"):
        raise TypeError(f"{type(lm).__name__}: no language_model.layers to compile")
    return list(language_model.layers)


def compile_language_model(model, backend: str = "inductor") -> int:
    """torch.compile every decoder layer of the language model in place; returns how many.

    One layer at a time rather than the whole model: the layers share one compiled graph, so the
    compile takes seconds, not minutes, and the vision tower and data-dependent image merging stay eager.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
