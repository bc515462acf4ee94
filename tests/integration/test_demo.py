"""`mole demo` end to end (small training settings), its summary, and skipping unchanged stages."""

import json

import pytest

from mole_trainer.cli import main

from ..helpers import NAMES, write_small_configs

pytestmark = pytest.mark.slow


def check_summary_figures(wd, summary: dict) -> None:
    """The summary's router and expert figures are those of the evaluation and expert runs, recomputed
    here from the per-request predictions and each expert's info file.

    At these test sizes (4 steps) the router is near chance (val 0.125, test 0.33 on 12 requests) and
    the experts score what their base scores, so no quality bar is asserted here; `make demo` (600
    router steps) reaches ~0.99 test accuracy against 0.25 chance.
    """
    preds = [json.loads(x) for x in (wd / "eval/router_report.predictions.jsonl").read_text().splitlines()]
    router = summary["router"]
    assert router["n_test"] == len(preds) == 3 * len(NAMES)  # test_per_expert: 3
    correct = sum(p["predicted"] == p["expert"] for p in preds)
    assert router["test_accuracy"] == pytest.approx(correct / len(preds))
    top2 = sum(p["expert"] in sorted(p["probs"], key=p["probs"].get)[-2:] for p in preds)
    assert router["top2_accuracy"] == pytest.approx(top2 / len(preds))
    assert set(summary["experts"]) == set(NAMES)
    for name, e in summary["experts"].items():
        info = json.loads((wd / f"checkpoints/experts/{name}/expert_info.json").read_text())
        assert (e["metric"], e["value"], e["base_value"]) == (
            info["metric"],
            info["value"],
            info["base_value"],
        )
        assert e["beats_base"] == (e["value"] > e["base_value"])


def test_demo_runs_every_stage_then_skips_what_did_not_change(tmp_path, capsys):
    wd = tmp_path / "demo"
    write_small_configs(wd / "config")
    assert main(["demo", "--workdir", str(wd)]) == 0
    summary = json.loads((wd / "summary.json").read_text())
    check_summary_figures(wd, summary)
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
