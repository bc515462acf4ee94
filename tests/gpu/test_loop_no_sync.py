"""On CUDA the loop's steps never make the host wait for the GPU (torch's sync debug mode raises on a sync)."""

import pytest
import torch

from mole_trainer.config import TrainSpec
from mole_trainer.train.loop import lower_is_better, train_loop
from tests.unit.test_train_loop import Toy, examples

pytestmark = pytest.mark.gpu


def test_steps_between_log_steps_do_not_synchronise():
    model = Toy().cuda()
    calls = {"n": 0}

    def evaluate():
        # the evaluation before the first step turns the check on; the last one (step 6) turns it off
        calls["n"] += 1
        if calls["n"] == 2:
            torch.cuda.set_sync_debug_mode(0)
        value = float(model.head.weight.norm())
        if calls["n"] == 1:
            torch.cuda.set_sync_debug_mode("error")
        return {"val_loss": value}

    spec = TrainSpec(lr=0.05, steps=6, batch_size=4, grad_accum=2, eval_every=6, data_workers=2)
    try:
        result = train_loop(
            model, examples(), spec, 0, evaluate, lower_is_better("val_loss", 0.0), report=print
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["n"] == 2 and result.steps == 6
    assert [e["step"] for e in result.log] == [0, 6]
