"""`mole test router`'s sample and table, and the recorded evaluation `mole deploy --min-accuracy` reads
(the CLI end to end is in tests/integration/test_pipeline_cli.py)."""

import json
import random
from pathlib import Path

import pytest

from mole_trainer.adapter_info import adapter_digest
from mole_trainer.data.records import Sample
from mole_trainer.errors import UserError
from mole_trainer.eval.router_check import (
    BelowThreshold,
    check_deployable,
    format_router_test,
    recorded_evaluation,
    select_per_expert,
)


def samples(n_per: dict[str, int]) -> list[Sample]:
    return [
        Sample(id=f"{e}/r{i}", images=[], instruction="x", answer="", expert=e)
        for e, n in n_per.items()
        for i in range(n)
    ]


def test_sample_per_expert_is_capped_and_independent_of_file_order():
    recs = samples({"a": 10, "b": 3})
    picked = select_per_expert(recs, ["a", "b", "c"], 4)
    assert [len(picked[n]) for n in "abc"] == [4, 3, 0]
    assert all(s.expert == n for n in "abc" for s in picked[n])
    shuffled = list(recs)
    random.Random(1).shuffle(shuffled)
    assert select_per_expert(shuffled, ["a", "b", "c"], 4) == picked
    # not simply the first records of the file
    assert [s.id for s in picked["a"]] != [f"a/r{i}" for i in range(4)]


def test_table_lists_every_expert_and_the_verdict():
    result = {
        "checkpoint": "ck",
        "test_data": "t.jsonl",
        "split": "test",
        "per_expert_asked": 4,
        "per_expert": {
            "a": {"n": 4, "correct": 3, "accuracy": 0.75},
            "b": {"n": 0, "correct": 0, "accuracy": None},
        },
        "n": 4,
        "correct": 3,
        "accuracy": 0.75,
        "min_accuracy": 0.8,
        "passed": False,
    }
    lines = format_router_test(result).splitlines()
    assert lines[2].split() == ["a", "4", "3", "0.750"] and lines[3].split() == ["b", "0", "0", "-"]
    assert lines[4].split() == ["overall", "4", "3", "0.750"]
    assert "warning: no records to test for b" in lines
    assert lines[-1] == "FAIL: accuracy 0.750 < --min-accuracy 0.8"


def fake_router(root: Path, weights: bytes = b"w1") -> Path:
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    return root


def test_recorded_evaluation_prefers_a_report_of_these_weights(tmp_path):
    ckpt = fake_router(tmp_path / "ck")
    assert recorded_evaluation(ckpt) is None
    (ckpt / "router_info.json").write_text(json.dumps({"best": {"val_accuracy": 0.9}}))
    assert recorded_evaluation(ckpt)["accuracy"] == 0.9
    digest = adapter_digest(ckpt / "adapter")
    report = {"accuracy": 0.7, "split": "test", "adapter_sha256": "0" * 64}
    (ckpt / "eval_report.json").write_text(json.dumps(report))
    rec = recorded_evaluation(ckpt)  # a report of other weights is ignored
    assert (rec["accuracy"], rec["what"]) == (0.9, "validation accuracy")
    (ckpt / "eval_report.json").write_text(json.dumps({**report, "adapter_sha256": digest}))
    rec = recorded_evaluation(ckpt)
    assert (rec["accuracy"], rec["what"], rec["source"]) == (
        0.7,
        "test accuracy",
        str(ckpt / "eval_report.json"),
    )
    with pytest.raises(BelowThreshold, match="below --min-accuracy 0.8") as exc:
        check_deployable(ckpt, 0.8)
    assert exc.value.exit_code == 1
    assert check_deployable(ckpt, 0.8, force=True)["forced"] is True
    assert check_deployable(ckpt, 0.7)["forced"] is False
    (ckpt / "adapter/adapter_model.safetensors").write_bytes(b"w2")
    with pytest.raises(UserError, match="not of the router weights"):
        recorded_evaluation(ckpt, ckpt / "eval_report.json")
    with pytest.raises(UserError, match="missing.json: not found"):
        recorded_evaluation(ckpt, tmp_path / "missing.json")


def test_gate_trusts_only_a_held_out_split(tmp_path):
    ckpt = fake_router(tmp_path / "ck")
    digest = adapter_digest(ckpt / "adapter")
    for split in (None, "train"):  # every record, or the train split: what the router trained on
        (ckpt / "eval_report.json").write_text(
            json.dumps({"accuracy": 1.0, "split": split, "adapter_sha256": digest})
        )
        with pytest.raises(UserError, match="not a held-out split"):
            recorded_evaluation(ckpt, ckpt / "eval_report.json")
    (ckpt / "eval_report.json").write_text(
        json.dumps({"accuracy": 0.6, "split": "val", "adapter_sha256": digest})
    )
    assert recorded_evaluation(ckpt)["accuracy"] == 0.6


def test_a_router_trained_on_another_prompt_is_flagged_when_loaded(tmp_path, capsys):
    from mole_trainer.adapter_info import read_adapter_info, write_adapter_info
    from mole_trainer.router_prompt import ROUTER_PROMPT_VERSION

    write_adapter_info(tmp_path, {"role": "router", "label_map": {"a": 0}})  # before versions were recorded
    read_adapter_info(tmp_path, "router")
    assert "router prompt version 1" in capsys.readouterr().err
    write_adapter_info(
        tmp_path, {"role": "router", "label_map": {"a": 0}, "prompt_version": ROUTER_PROMPT_VERSION}
    )
    read_adapter_info(tmp_path, "router")
    assert capsys.readouterr().err == ""
