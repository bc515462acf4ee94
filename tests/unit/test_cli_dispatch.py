"""The command table wires each `mole` sub-command to its own stage function, with the parsed values."""

from __future__ import annotations

import pytest

from mole_trainer import stages
from mole_trainer.cli import main


class Dispatched(Exception):
    """Raised by a stand-in stage function instead of running the stage."""


W = "wd"  # the --workdir every case passes; handlers hand it to the stage as the workdir

CASES = [
    (["model", "tiny", "--out", "o", "--seed", "3"], "model_tiny", ("o", W, 3, None), {}),
    (
        ["data", "synth", "--out", "o", "--val", "2", "--experts", "a, b", "--size", "10x20"],
        "data_synth",
        ("o", W, ["a", "b"], {"train": None, "val": 2, "test": None}, 0, (10, 20)),
        {},
    ),
    (
        ["data", "routing", "--config", "c.yaml", "--output", "r.jsonl"],
        "data_routing",
        ("c.yaml", "r.jsonl", W),
        {},
    ),
    (["data", "check", "d"], "data_check", ("d", W), {}),
    (
        ["data", "ocr-crops", "--input", "i", "--output", "o", "--padding", "1", "--engine", "opencv"],
        "data_ocr_crops",
        ("i", "o", W, 1, None, "opencv", None, None),
        {},
    ),
    (
        ["data", "preprocess", "--input", "i", "--output", "o", "--model", "m", "--max-pixels", "99"],
        "data_preprocess",
        ("i", "o", "m", "sft", None, None, 99, W),
        {"config": None, "workers": 1, "strict": False},
    ),
    (
        ["data", "convert", "--input", "i", "--output", "o", "--to", "hf"],
        "data_convert",
        ("i", "o", "hf", W),
        {},
    ),
    (
        ["train", "experts", "--config", "l.yaml", "--only", "x", "--device", "cpu"],
        "train_experts",
        ("l.yaml", W, ["x"], "cpu", "auto"),
        {"resume": False, "concurrent": False},
    ),
    (
        ["train", "router", "--dataset-path", "p", "--config", "r.yaml", "--resume"],
        "train_router",
        ("p", "r.yaml", W, "auto", "auto"),
        {"resume": True},
    ),
    (
        ["eval", "router", "--checkpoint", "c", "--test-data", "t", "--split", "val", "--consistency"],
        "eval_router",
        ("c", "t", None, "val", W, 8, "auto", "auto", True, None),
        {},
    ),
    (
        [
            "test",
            "router",
            "--checkpoint",
            "c",
            "--test-data",
            "t",
            "--min-accuracy",
            "0.5",
            "--split",
            "",
            "--per-expert",
            "2",
        ],
        "test_router",
        ("c", "t", 2, 0.5, None, W),
        {},
    ),
    (
        ["deploy", "--checkpoint", "c", "--experts", "e", "--bucket", "b", "--min-accuracy", "0.7"],
        "deploy",
        ("c", "e", "b", W, 0.7, False, None),
        {},
    ),
    (["deploy", "list", "u"], "deploy_list", ("u",), {}),
    (["deploy", "verify", "u", "r1"], "deploy_verify", ("u", "r1"), {}),
    (["deploy", "promote", "u", "r1"], "deploy_promote", ("u", "r1", W), {}),
    (["deploy", "rollback", "u"], "deploy_rollback", ("u", W), {}),
    (["deploy", "gc", "u", "--keep", "2", "--grace", "5"], "deploy_gc", ("u", 2, W, 5.0), {}),
    (["history", "show", "--stage", "eval", "--limit", "3"], "history_show", (W, "eval", 3), {}),
    (["history", "report", "--output", "r.html"], "history_report", (W, "r.html"), {}),
    (["history", "plot", "--output-dir", "figs", "--run", "abc"], "history_plot", (W, "figs", "abc"), {}),
    (["history", "backfill", "runs"], "history_backfill", ("runs", W), {}),
]


@pytest.mark.parametrize(("argv", "stage", "args", "kwargs"), CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_each_subcommand_calls_its_own_stage(monkeypatch, argv, stage, args, kwargs):
    for name in {c[1] for c in CASES}:

        def called(*a, _name=name, **kw):
            raise Dispatched(_name, a, kw)

        monkeypatch.setattr(stages, name, called)
    with pytest.raises(Dispatched) as caught:
        main(["--workdir", W, *argv])
    name, got_args, got_kwargs = caught.value.args
    assert name == stage
    assert got_args[: len(args)] == args
    assert {k: got_kwargs[k] for k in kwargs} == kwargs
