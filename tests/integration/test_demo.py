"""`mole demo` end to end (cut-down training settings), what it learns, and skipping unchanged stages."""

import json

import pytest

from mole_trainer.cli import main

from ..helpers import (
    NAMES,
    QUALITY_ROUTER_STEPS,
    QUALITY_TEST_PER_EXPERT,
    write_quality_configs,
    write_small_configs,
)

pytestmark = pytest.mark.slow


def check_summary_figures(wd, summary: dict) -> None:
    """The summary's router and expert figures are those of the evaluation and expert runs, recomputed
    here from the per-request predictions and each expert's info file."""
    preds = [json.loads(x) for x in (wd / "eval/router_report.predictions.jsonl").read_text().splitlines()]
    router = summary["router"]
    assert router["n_test"] == len(preds) == QUALITY_TEST_PER_EXPERT * len(NAMES)
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


# Test top-1 the router must reach: 24 of 32 requests, which guessing among 4 experts (p = 0.25) reaches
# with probability 4e-9 (binomial tail), so passing is not luck.
MIN_ROUTER_ACCURACY = 0.75


def check_learned(wd, summary: dict) -> None:
    """Training worked: the router routes far above chance, every expert scores above its untrained
    base on its own task metric, and the deployed engine routes as the evaluated router did."""
    assert summary["router"]["test_accuracy"] >= MIN_ROUTER_ACCURACY
    beaten = {n: (e["value"], e["base_value"]) for n, e in summary["experts"].items() if not e["beats_base"]}
    assert beaten == {}, f"experts not above their base (expert, base): {beaten}"
    evaluated = {
        p["id"]: p["predicted"]
        for p in map(json.loads, (wd / "eval/router_report.predictions.jsonl").read_text().splitlines())
    }
    deployed = [json.loads(x) for x in (wd / "eval/stacked_inference.jsonl").read_text().splitlines()]
    assert len(deployed) == summary["stacked_inference"]["requests"] == 2 * len(NAMES)
    assert {r["id"]: r["expert"] for r in deployed} == {r["id"]: evaluated[r["id"]] for r in deployed}


def test_demo_runs_every_stage_then_skips_what_did_not_change(tmp_path, capsys):
    wd = tmp_path / "demo"
    write_quality_configs(wd / "config")
    assert main(["demo", "--workdir", str(wd)]) == 0
    summary = json.loads((wd / "summary.json").read_text())
    check_summary_figures(wd, summary)
    check_learned(wd, summary)
    stages = ["model", "synth", "routing", "preprocess", "experts", "router", "eval", "deploy", "infer"]
    assert list(summary["stage_seconds"]) == stages
    assert summary["skipped_stages"] == []
    assert (wd / "deploy/CURRENT").is_file() and (wd / "history.sqlite").is_file()
    report = wd / "history_report.html"  # the demo ends by writing the history report, and names it
    assert summary["artifacts"]["history_report"] == str(report) and report.is_file()

    capsys.readouterr()
    assert main(["demo", "--workdir", str(wd)]) == 0
    assert json.loads((wd / "summary.json").read_text())["skipped_stages"] == stages
    assert "unchanged, skipped" in capsys.readouterr().out

    # a router config edit re-runs the router and what depends on it, nothing upstream
    router_cfg = wd / "config/router.yaml"
    steps = f"steps: {QUALITY_ROUTER_STEPS}\n"
    router_cfg.write_text(router_cfg.read_text().replace(steps, "steps: 2\n"))  # 2 steps: a cheap re-run
    assert main(["demo", "--workdir", str(wd)]) == 0
    skipped = json.loads((wd / "summary.json").read_text())["skipped_stages"]
    assert skipped == ["model", "synth", "routing", "preprocess", "experts"]


def test_demo_reports_a_broken_config_edit(tmp_path, capsys):
    wd = tmp_path / "demo"
    write_small_configs(wd / "config")
    (wd / "config/router.yaml").write_text("train: {stepz: 3}\n")
    assert main(["demo", "--workdir", str(wd)]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
