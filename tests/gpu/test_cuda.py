"""GPU checks on the tiny model: bf16 training steps and routing on CUDA (skipped without CUDA)."""

import pytest
import torch

from mole_trainer.config import LoraSpec, TrainSpec
from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import encode_sample
from mole_trainer.infer.scoring import route_probs
from mole_trainer.model.loading import load_base, load_processor
from mole_trainer.model.lora import attach_lora
from mole_trainer.train.loop import eval_loss, lower_is_better, train_loop

pytestmark = pytest.mark.gpu


def test_bf16_lora_training_and_routing_on_cuda(tiny_model, synth_data):
    processor = load_processor(str(tiny_model), 4096, 20000)
    model = attach_lora(load_base(str(tiny_model), "auto", "cuda"), LoraSpec(rank=4), seed=0)
    assert next(model.parameters()).device.type == "cuda"
    samples = load_expert_dataset(synth_data / "calendar")["train"]
    examples = [encode_sample(processor, s, "sft") for s in samples]
    pad = processor.tokenizer.pad_token_id
    before = eval_loss(model, examples, pad, 4)
    spec = TrainSpec(lr=3e-3, steps=10, batch_size=4, eval_every=5, warmup_ratio=0.0)
    train_loop(
        model,
        examples,
        spec,
        pad,
        lambda: {"loss": eval_loss(model, examples, pad, 4)},
        lower_is_better("loss", 0.0),
    )
    assert eval_loss(model, examples, pad, 4) < before
    for s in samples[:3]:
        s.expert = "calendar"
    probs = route_probs(model, processor, samples[:3], ["calendar", "ocr"])
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-3)


def test_resume_and_gradient_checkpointing_on_cuda(tiny_model, synth_data, tmp_path):
    processor = load_processor(str(tiny_model), 4096, 20000)
    samples = load_expert_dataset(synth_data / "calendar")["train"]
    examples = [encode_sample(processor, s, "sft") for s in samples]
    pad = processor.tokenizer.pad_token_id
    spec = TrainSpec(lr=3e-3, steps=6, batch_size=4, eval_every=2, save_every=1, gradient_checkpointing=True)

    def train(out, resume=False, crash_at=None):
        model = attach_lora(load_base(str(tiny_model), "auto", "cuda"), LoraSpec(rank=4), seed=0)
        calls = []

        def evaluate():
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt
            return {"loss": eval_loss(model, examples, pad, 4)}

        result = train_loop(
            model, examples, spec, pad, evaluate, lower_is_better("loss", 0.0), None, out, resume=resume
        )
        return model, result

    ref, _ = train(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", crash_at=3)
    resumed, result = train(tmp_path / "cut", resume=True)
    assert result.resumed_from == 3
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)
