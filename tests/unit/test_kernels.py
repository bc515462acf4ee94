"""The `kernels:` settings on the CPU: attention implementation, liger-kernel guard, compiled decoder layers."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType

import pytest
import torch

from mole_trainer.config import KernelSpec, LoraSpec
from mole_trainer.data.preprocess import IGNORE_INDEX
from mole_trainer.errors import UserError
from mole_trainer.model.kernels import apply_liger, check_kernels, compile_language_model, load_training_base
from mole_trainer.model.lora import attach_lora
from mole_trainer.train.loss import answer_loss_sum


@pytest.fixture(scope="module")
def text_batch(tiny_model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (3, 20), generator=gen)
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _lora(tiny_model, spec: KernelSpec):
    model = attach_lora(load_training_base(str(tiny_model), "float32", "cpu", spec), LoraSpec(rank=4), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    return model


def _loss_and_grads(model, batch, labels):
    model.zero_grad(set_to_none=True)
    loss = answer_loss_sum(model, *[batch, labels])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eager_attention_from_config_matches_sdpa(tiny_model, text_batch):
    sdpa, eager = _lora(tiny_model, KernelSpec()), _lora(tiny_model, KernelSpec(attn_implementation="eager"))
    assert eager.get_base_model().config._attn_implementation == "eager"
    assert sdpa.get_base_model().config._attn_implementation == "sdpa"
    (a, ga), (b, gb) = _loss_and_grads(sdpa, *text_batch), _loss_and_grads(eager, *text_batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for n in ga:  # sdpa and eager sum in different orders: equal to 1e-5 of each gradient's scale
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=1e-5 * float(ga[n].abs().max()))


@pytest.mark.slow  # seconds: left out of make test-fast
def test_compiled_decoder_layers_give_the_same_loss_and_gradients(tiny_model, text_batch):
    # the "eager" backend traces the layers with dynamo (graph breaks and guards are exercised) but
    # skips code generation, which takes minutes on 2 CPU cores; a GPU run uses inductor
    plain, compiled = _lora(tiny_model, KernelSpec()), _lora(tiny_model, KernelSpec())
    assert compile_language_model(compiled, backend="eager") == len(
        compiled.get_base_model().model.language_model.layers
    )
    assert all(
        layer._compiled_call_impl is not None
        for layer in compiled.get_base_model().model.language_model.layers
    )
    (a, ga), (b, gb) = _loss_and_grads(plain, *text_batch), _loss_and_grads(compiled, *text_batch)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_a_config_error():
    with pytest.raises(
        UserError, match="kernels.attn_implementation: flash_attention_2 needs the flash-attn"
    ):
        check_kernels(KernelSpec(attn_implementation="flash_attention_2"), "cuda")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_the_package_names_the_gpu_extra():
    with pytest.raises(
        UserError, match=r"kernels.liger: liger-kernel is not installed .*mole-trainer\[gpu\]"
    ):
        check_kernels(KernelSpec(liger=True), "cuda")


def test_liger_is_refused_on_the_cpu_and_applied_to_the_model_without_its_loss(monkeypatch):
    calls = []
    transformers = ModuleType("liger_kernel.transformers")
    transformers.apply_liger_kernel_to_qwen3_vl = lambda **kw: calls.append(kw)
    package = ModuleType("liger_kernel")
    package.__path__, package.__spec__ = [], importlib.machinery.ModuleSpec("liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers)
    with pytest.raises(UserError, match="kernels.liger: .* CUDA only"):
        check_kernels(KernelSpec(liger=True), "cpu")
    check_kernels(KernelSpec(liger=True), "cuda")
    model = object()
    apply_liger(model)
    assert calls == [
        {
            "rope": True,
            "rms_norm": True,
            "swiglu": True,
            "cross_entropy": False,
            "fused_linear_cross_entropy": False,
            "model": model,
        }
    ]


def test_an_unknown_attention_implementation_is_a_config_error(tmp_path):
    from mole_trainer.config import RouterConfig, load_config

    path = tmp_path / "router.yaml"
    path.write_text("kernels:\n  attn_implementation: flash\n")
    with pytest.raises(UserError, match="kernels.attn_implementation: must be one of sdpa, eager"):
        load_config(path, RouterConfig)
