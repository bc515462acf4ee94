"""One prefill per request: the packed-label scorer reproduces the K-row reference scoring."""

import pytest
import torch

from mole_trainer.config import LoraSpec
from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.preprocess import encode_sample
from mole_trainer.data.records import Sample
from mole_trainer.infer.scoring import encode_router_prompts, label_loss, label_token_ids, score_encoded
from mole_trainer.model.loading import load_base, load_processor
from mole_trainer.model.lora import attach_lora
from mole_trainer.train.loop import eval_loss
from tests.reference_scoring import score_encoded_reference

# label lengths differ (one to several tokens before the end of turn): the packed row mixes them
NAMES = ["calendar", "chart-screen", "login-window", "ocr", "receipt-and-invoice-transcription"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def processor(tiny_model):
    return load_processor(str(tiny_model), 4096, 20000)


@pytest.fixture(scope="module")
def requests(synth_data):
    """Padding (prompts of different lengths), two images in one request, a text-only request."""
    cal, ocr = (load_expert_dataset(synth_data / n)["test"] for n in ("calendar", "ocr"))
    two = Sample("two", [cal[1].images[0], ocr[1].images[0]], "Compare the two screens.", "", expert="ocr")
    text = Sample("text", [], "Read this word out loud to me, please: " + "cake " * 12, "", expert="ocr")
    return [cal[0], two, text, ocr[0]]


def _prompts(processor, samples):
    return encode_router_prompts(processor, samples, NAMES)


def _lora(tiny_model, attn="sdpa"):
    """A router LoRA on every projection with random B matrices (fresh LoRA is a no-op: B = 0)."""
    model = attach_lora(
        load_base(str(tiny_model), "float32", "cpu", attn=attn),
        LoraSpec(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
        seed=0,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def _max_diff(model, prompts, labels, pad):
    new = score_encoded(model, prompts, labels, pad)
    ref = score_encoded_reference(model, prompts, labels, pad)
    assert new.shape == ref.shape == (len(prompts), len(labels))
    return float((new - ref).abs().max()), ref


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_one_prefill_equals_k_rows(tiny_model, processor, requests, attn):
    labels = label_token_ids(processor.tokenizer, NAMES)
    assert len({len(lab) for lab in labels}) >= 3
    prompts = _prompts(processor, requests)
    assert len({len(p["input_ids"]) for p in prompts}) == len(prompts)  # every row padded differently
    pad = processor.tokenizer.pad_token_id
    model = load_base(str(tiny_model), "float32", "cpu", attn=attn)
    diff, _ = _max_diff(model, prompts, labels, pad)
    assert diff <= TOLERANCE
    # a text-only batch after an image batch: no rope delta may leak from the previous call
    diff, _ = _max_diff(model, prompts[2:3], labels, pad)
    assert diff <= TOLERANCE


@pytest.mark.slow  # seconds: left out of make test-fast
def test_one_prefill_equals_k_rows_with_an_adapter(tiny_model, processor, requests):
    labels = label_token_ids(processor.tokenizer, NAMES)
    prompts = _prompts(processor, requests)
    pad = processor.tokenizer.pad_token_id
    model = _lora(tiny_model)
    diff, with_adapter = _max_diff(model, prompts, labels, pad)
    assert diff <= TOLERANCE
    with model.disable_adapter():
        without = score_encoded(model, prompts, labels, pad)
    assert float((with_adapter - without).abs().max()) > 1.0  # the adapter moves the scores: a real check


def test_validation_loss_from_scores_equals_teacher_forced_loss(tiny_model, processor, requests):
    """label_loss (router validation) is the per-token cross-entropy of the router's training examples."""
    labels = label_token_ids(processor.tokenizer, NAMES)
    model = _lora(tiny_model)
    truth = [NAMES.index(s.expert) for s in requests]
    scores = score_encoded(model, _prompts(processor, requests), labels, processor.tokenizer.pad_token_id)
    examples = [encode_sample(processor, s, "router", NAMES) for s in requests]
    expected = eval_loss(model, examples, processor.tokenizer.pad_token_id, batch_size=2)
    assert label_loss(scores, truth, labels) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # seconds: left out of make test-fast
def test_scoring_turns_the_cache_on_whatever_the_config_says(tiny_model, processor, requests):
    """Gradient checkpointing (train/loop.py) and some checkpoints switch use_cache off in the config."""
    from mole_trainer.train.loop import enable_gradient_checkpointing

    labels = label_token_ids(processor.tokenizer, NAMES)
    prompts = _prompts(processor, requests)
    pad = processor.tokenizer.pad_token_id
    model = _lora(tiny_model)
    before = score_encoded(model, prompts, labels, pad)
    enable_gradient_checkpointing(model)
    model.config.text_config.use_cache = False
    model.train()
    model.eval()  # as train_loop does around evaluate()
    assert float((score_encoded(model, prompts, labels, pad) - before).abs().max()) <= TOLERANCE


def test_a_model_loaded_with_unmaskable_attention_is_scored_with_sdpa(
    tiny_model, processor, requests, monkeypatch
):
    """Router evaluation (encoded_scores) of a model trained with flash_attention_2 switches to sdpa and
    back. Flash-attn needs CUDA, so eager stands in for it here: declared not maskable."""
    from mole_trainer.infer import scoring

    labels = label_token_ids(processor.tokenizer, NAMES)
    prompts = _prompts(processor, requests)
    pad = processor.tokenizer.pad_token_id
    expected = scoring.encoded_scores(_lora(tiny_model, "sdpa"), prompts, labels, pad, batch_size=2)
    monkeypatch.setattr(scoring, "MASKABLE_ATTENTION", ("sdpa",))
    model = _lora(tiny_model, "eager")
    with pytest.raises(ValueError, match="router scoring needs sdpa attention, not 'eager'"):
        score_encoded(model, prompts, labels, pad)
    assert torch.equal(scoring.encoded_scores(model, prompts, labels, pad, batch_size=2), expected)
    config = model.get_base_model().config
    assert (config._attn_implementation, config.text_config._attn_implementation) == ("eager", "eager")
    assert config.vision_config._attn_implementation == "eager"
