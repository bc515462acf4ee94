"""`mole demo` end to end (small training settings), its summary, and skipping unchanged stages."""

import json

import pytest

from mole_trainer.cli import main

from ..helpers import NAMES, write_small_configs

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_then_skips_what_did_not_change(tmp_path, capsys):
    wd = tmp_path / "demo"
    write_small_configs(wd / "config")
    assert main(["demo", "--workdir", str(wd)]) == 0
    summary = json.loads((wd / "summary.json").read_text())
    assert set(summary["router"]) >= {"test_accuracy", "top2_accuracy"}
    assert set(summary["experts"]) == set(NAMES)
    for e in summary["experts"].values():
        assert {"metric", "value", "base_value"} <= set(e)
    stages = ["model", "synth", "routing", "preprocess", "experts", "router", "eval", "deploy", "infer"]
    assert list(summary["stage_seconds"]) == stages
    assert summary["skipped_stages"] == []
    assert (wd / "deploy/CURRENT").is_file() and (wd / "history.sqlite").is_file()
    assert summary["stacked_inference"]["requests"] == 2 * len(NAMES)
    report = wd / "history_report.html"  # the demo ends by writing the history report, and names it
    assert summary["artifacts"]["history_report"] == str(report) and report.is_file()

    capsys.readouterr()
    assert main(["demo", "--workdir", str(wd)]) == 0
    assert json.loads((wd / "summary.json").read_text())["skipped_stages"] == stages
    assert "unchanged, skipped" in capsys.readouterr().out

    # a router config edit re-runs the router and what depends on it, nothing upstream
    router_cfg = wd / "config/router.yaml"
    router_cfg.write_text(router_cfg.read_text().replace("steps: 4", "steps: 2"))
    assert main(["demo", "--workdir", str(wd)]) == 0
    skipped = json.loads((wd / "summary.json").read_text())["skipped_stages"]
    assert skipped == ["model", "synth", "routing", "preprocess", "experts"]


def test_demo_reports_a_broken_config_edit(tmp_path, capsys):
    wd = tmp_path / "demo"
    write_small_configs(wd / "config")
    (wd / "config/router.yaml").write_text("train: {stepz: 3}\n")
    assert main(["demo", "--workdir", str(wd)]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
