"""End to end through the real CLI on the tiny model: every stage command, in pipeline order."""

import json
from pathlib import Path

import pytest

from mole_trainer.cli import main

from ..helpers import NAMES, png_has_drawing, report_images, write_small_configs

pytestmark = pytest.mark.slow


def mole(wd: Path, *args: str) -> None:
    assert main(["--workdir", str(wd), *args]) == 0


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    w = tmp_path_factory.mktemp("pipeline")
    write_small_configs(w / "config")
    mole(w, "model", "tiny", "--out", str(w / "model/tiny-qwen3-vl"))
    mole(
        w,
        "data",
        "synth",
        "--out",
        str(w / "data/experts"),
        "--train",
        "10",
        "--val",
        "3",
        "--test",
        "4",
        "--size",
        "320x240",
    )
    mole(
        w,
        "data",
        "routing",
        "--config",
        str(w / "config/dataset.yaml"),
        "--output",
        str(w / "data/routing/routing_data.jsonl"),
    )
    mole(
        w,
        "data",
        "preprocess",
        "--input",
        str(w / "data/routing/routing_data.jsonl"),
        "--output",
        str(w / "prep/router"),
        "--config",
        str(w / "config/router.yaml"),
    )
    mole(w, "train", "experts", "--config", str(w / "config/loras.yaml"), "--device", "cpu")
    mole(
        w,
        "train",
        "router",
        "--dataset-path",
        str(w / "prep/router"),
        "--config",
        str(w / "config/router.yaml"),
    )
    mole(
        w,
        "eval",
        "router",
        "--checkpoint",
        str(w / "checkpoints/router"),
        "--test-data",
        str(w / "data/routing/routing_data.jsonl"),
        "--output",
        str(w / "eval/report.json"),
        "--consistency",
    )
    mole(
        w,
        "deploy",
        "--checkpoint",
        str(w / "checkpoints/router"),
        "--experts",
        str(w / "checkpoints/experts"),
        "--bucket",
        str(w / "deploy"),
    )
    return w


def test_model_and_data(wd):
    assert (wd / "model/tiny-qwen3-vl/config.json").is_file()
    assert (wd / "model/tiny-qwen3-vl/tokenizer.json").is_file()
    label_map = json.loads((wd / "data/routing/label_map.json").read_text())
    assert label_map == {n: i for i, n in enumerate(NAMES)}
    meta = json.loads((wd / "prep/router/meta.json").read_text())
    # the demo's dataset.yaml augments: one rewritten copy of half of the 32 train records
    assert meta["task"] == "router" and meta["counts"] == {"train": 48, "val": 8, "test": 12}
    records = [json.loads(x) for x in (wd / "data/routing/routing_data.jsonl").read_text().splitlines()]
    copies = [r for r in records if "#aug" in r["id"]]
    assert len(copies) == 16 and {r["split"] for r in copies} == {"train"}
    assert (meta["min_pixels"], meta["max_pixels"]) == (4096, 20000)  # from router.yaml


def test_experts_are_plain_peft_adapters(wd):
    from peft import PeftModel

    from mole_trainer.model.loading import load_base

    # each expert is scored with its own task's metric, trained and untrained
    metrics = {
        "calendar": "click_score",
        "chart-screen": "answer_score",
        "login-window": "action_score",
        "ocr": "char_similarity",
    }
    for n in NAMES:
        info = json.loads((wd / f"checkpoints/experts/{n}/expert_info.json").read_text())
        assert info["metric"] == metrics[n]
        assert isinstance(info["value"], float) and isinstance(info["base_value"], float)
    model = PeftModel.from_pretrained(
        load_base(str(wd / "model/tiny-qwen3-vl"), "float32", "cpu"), wd / "checkpoints/experts/ocr/adapter"
    )
    assert any("lora_A" in name for name, _ in model.named_parameters())


def check_keep_best(info: dict, train_log: Path) -> None:
    """The router kept the evaluation with the highest val accuracy (lowest val loss among ties)."""
    evals = [e for e in map(json.loads, train_log.read_text().splitlines()) if "val_accuracy" in e]
    top = max(e["val_accuracy"] for e in evals)
    best = min((e for e in evals if e["val_accuracy"] == top), key=lambda e: e["val_loss"])
    assert info["best_step"] == best["step"]
    assert info["best"] == {"val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"]}


def check_consistency_rates(consistency: dict, n: int) -> None:
    """Scoring does not depend on the batch; each rate counts agreeing requests out of n."""
    assert consistency["batch_invariance"] == 1.0
    rates = consistency["perturbations"].values()
    assert all(abs(r * n - round(r * n)) < 1e-3 for r in rates)
    assert consistency["perturbation_mean"] == pytest.approx(sum(rates) / len(rates), abs=1e-4)


def test_router_and_eval_report(wd):
    info = json.loads((wd / "checkpoints/router/router_info.json").read_text())
    check_keep_best(info, wd / "checkpoints/router/train_log.jsonl")
    first = json.loads((wd / "checkpoints/router/train_log.jsonl").read_text().splitlines()[0])
    assert info["best"]["val_loss"] < first["val_loss"]  # four steps already teach the label format
    assert json.loads((wd / "checkpoints/router/adapter/label_map.json").read_text())["ocr"] == 3
    from mole_trainer.router_prompt import ROUTER_PROMPT_VERSION

    adapter_info = json.loads((wd / "checkpoints/router/adapter/mole_adapter.json").read_text())
    assert adapter_info["prompt_version"] == ROUTER_PROMPT_VERSION
    report = json.loads((wd / "eval/report.json").read_text())
    assert report["n"] == 12 and set(report["top_k"]) == {"1", "2"}
    assert report["top_k"]["2"] >= report["top_k"]["1"] == report["accuracy"]
    assert sum(map(sum, report["confusion"]["matrix"])) == 12
    consistency = report["consistency"]
    assert set(consistency["perturbations"]) == {
        "jpeg",
        "resize",
        "brightness",
        "punctuation",
        "lower-case",
        "polite-prefix",
    }
    assert consistency["perturbations"]["lower-case"] == 1.0  # the router prompt canonicalises case
    check_consistency_rates(consistency, report["n"])
    preds = (wd / "eval/report.predictions.jsonl").read_text().splitlines()
    assert len(preds) == 12


def test_deployment_layout_and_manifest(wd):
    from mole_trainer.deploy import sha256_file

    release = json.loads((wd / "deploy/CURRENT").read_text())["release"]
    dest = wd / "deploy/releases" / release
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["release"] == release
    assert Path(manifest["base_model"]).resolve() == (wd / "model/tiny-qwen3-vl").resolve()
    # the training runs of this work dir's history that wrote the deployed adapters
    assert manifest["runs"]["router"] and set(manifest["runs"]["experts"]) == set(NAMES)
    assert all(manifest["runs"]["experts"].values())
    assert "val_accuracy" in manifest["router_evaluation"]["figures"]
    assert (dest / "routing/adapter/adapter_config.json").is_file()
    for n in NAMES:
        assert (dest / f"loras/{n}/adapter/adapter_model.safetensors").is_file()
        assert json.loads((dest / f"loras/{n}/deploy_metadata.json").read_text())["expert"] == n
    for entry in manifest["files"]:
        assert sha256_file(dest / entry["path"]) == entry["sha256"]


def test_infer_single_request_and_jsonl(wd, capsys):
    image = next((wd / "data/experts/calendar/images").iterdir())
    capsys.readouterr()
    mole(
        wd,
        "infer",
        "--deployment",
        str(wd / "deploy"),
        "--image",
        str(image),
        "--prompt",
        "Click on the 3rd.",
        "--max-new-tokens",
        "4",
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split("\t")[1] in NAMES
    reqs = wd / "data/experts/requests.jsonl"
    reqs.write_text(
        json.dumps({"id": "a", "image": f"calendar/images/{image.name}", "prompt": "Pick the 5th"})
        + "\n"
        + json.dumps({"id": "b", "image": f"calendar/images/{image.name}", "prompt": "Read it"})
        + "\n"
    )
    mole(
        wd,
        "infer",
        "--deployment",
        str(wd / "deploy"),
        "--input",
        str(reqs),
        "--output",
        str(wd / "out.jsonl"),
        "--max-new-tokens",
        "4",
    )
    results = [json.loads(x) for x in (wd / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", "b"]
    assert all(r["expert"] in NAMES and abs(sum(r["probs"].values()) - 1) < 1e-3 for r in results)
    mole(
        wd,
        "infer",
        "--deployment",
        str(wd / "deploy"),
        "--input",
        str(reqs),
        "--expert",
        "ocr",
        "--max-new-tokens",
        "2",
    )
    assert "\tocr\tforced\t" in capsys.readouterr().out


def test_history_records_every_stage(wd, capsys):
    capsys.readouterr()
    mole(wd, "history", "show", "--json")
    runs = json.loads(capsys.readouterr().out)
    stages = {r["stage"] for r in runs}
    assert {
        "model.tiny",
        "data.synth",
        "data.routing",
        "data.preprocess",
        "train.experts",
        "train.router",
        "eval.router",
        "deploy",
        "infer",
    } <= stages
    assert all(r["status"] == "ok" for r in runs)
    mole(wd, "history", "show")
    assert "train.router" in capsys.readouterr().out


def test_history_keeps_curves_cost_and_figures_of_the_real_pipeline(wd, tmp_path, capsys):
    from mole_trainer.history_report import FIGURES
    from mole_trainer.history_view import read_history

    data = read_history(wd)
    router = next(r for r in data.runs if r["stage"] == "train.router")
    log = [json.loads(x) for x in (wd / "checkpoints/router/train_log.jsonl").read_text().splitlines()]
    assert data.series(router["run_id"])["val_loss"] == [(e["step"], e["val_loss"]) for e in log]
    experts = next(r for r in data.runs if r["stage"] == "train.experts")
    assert {f"{n}/val_loss" for n in NAMES} <= set(data.series(experts["run_id"]))
    for run in data.runs:  # recorded on this machine's CPUs, from this checkout
        assert run["device"].startswith("cpu:") and run["cost_usd"] > 0 and run["git_commit"]
    out = tmp_path / "report.html"
    mole(wd, "history", "report", "--output", str(out))
    images = report_images(out.read_text(), FIGURES)
    assert {name: png_has_drawing(png) for name, png in images.items()} == dict.fromkeys(FIGURES, True)


def test_eval_rejects_label_outside_the_map(wd, tmp_path):
    bad = wd / "data/routing/bad.jsonl"
    line = json.loads((wd / "data/routing/routing_data.jsonl").read_text().splitlines()[0])
    line["expert"], line["split"] = "weather", "test"
    bad.write_text(json.dumps(line) + "\n")
    assert (
        main(
            [
                "--workdir",
                str(tmp_path),
                "eval",
                "router",
                "--checkpoint",
                str(wd / "checkpoints/router"),
                "--test-data",
                str(bad),
            ]
        )
        == 2
    )


def test_best_checkpoint_and_log_written(wd):
    for folder, info in (
        (wd / "checkpoints/router", "router_info.json"),
        (wd / "checkpoints/experts/calendar", "expert_info.json"),
    ):
        log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [0, 2, 4]
        best_step = json.loads((folder / info).read_text())["best_step"]
        best = folder / "checkpoints/best"
        if best_step:
            assert json.loads((best / "state.json").read_text())["step"] == best_step
            assert (best / "adapter_model.safetensors").is_file()
        else:
            assert not best.exists()


def test_wrong_artifacts_are_user_errors(wd, tmp_path, capsys):
    ckpt = wd / "checkpoints"
    cases = [
        (
            [
                "deploy",
                "--checkpoint",
                str(ckpt / "experts/ocr"),
                "--experts",
                str(ckpt / "experts"),
                "--bucket",
                str(tmp_path / "d"),
            ],
            "is a 'expert', expected a 'router'",
        ),
        (
            [
                "eval",
                "router",
                "--checkpoint",
                str(ckpt / "experts/ocr"),
                "--test-data",
                str(wd / "data/routing/routing_data.jsonl"),
            ],
            "expected a 'router'",
        ),
        (
            [
                "train",
                "router",
                "--dataset-path",
                str(ckpt / "experts/ocr/prep"),
                "--config",
                str(wd / "config/router.yaml"),
            ],
            "preprocessed for task 'sft', expected 'router'",
        ),
        (
            [
                "data",
                "preprocess",
                "--input",
                str(wd / "data/experts/ocr"),
                "--output",
                str(tmp_path / "p"),
                "--model",
                "Qwen/Qwen3-VL-8B-Instruct",
            ],
            "Qwen/Qwen3-VL-8B-Instruct: cannot load the processor",
        ),
        (
            ["data", "preprocess", "--input", str(wd / "data/experts/ocr"), "--output", str(tmp_path / "p")],
            "preprocess needs --model",
        ),
        (
            [
                "infer",
                "--deployment",
                str(tmp_path / "nothing"),
                "--image",
                str(next((wd / "data/experts/ocr/images").iterdir())),
                "--prompt",
                "Read it",
            ],
            "no manifest.json",
        ),
    ]
    for args, fragment in cases:
        capsys.readouterr()
        assert main(["--workdir", str(tmp_path), *args]) == 2, args
        assert fragment in capsys.readouterr().err, args


def test_moved_deployment_with_base_model_override_and_mixed_bases(wd, tmp_path, capsys):
    import shutil

    copied = tmp_path / "moved"
    shutil.copytree(wd / "deploy", copied)
    moved = copied / "releases" / json.loads((copied / "CURRENT").read_text())["release"]
    model_copy = tmp_path / "elsewhere/tiny"
    shutil.copytree(wd / "model/tiny-qwen3-vl", model_copy)
    image = next((wd / "data/experts/ocr/images").iterdir())
    request = ["--image", str(image), "--prompt", "Read the note", "--max-new-tokens", "2"]
    capsys.readouterr()
    mole(tmp_path, "infer", "--deployment", str(copied), "--base-model", str(model_copy), *request)
    assert capsys.readouterr().out.strip().split("\t")[1] in NAMES
    # an expert trained on another base cannot join this deployment
    info_path = moved / "loras/ocr/adapter/mole_adapter.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "base_model": "Qwen/Qwen3-VL-8B-Instruct"}))
    from mole_trainer.deploy import deploy

    # `mole deploy` refuses it ...
    assert (
        main(
            [
                "--workdir",
                str(tmp_path),
                "deploy",
                "--checkpoint",
                str(moved / "routing"),
                "--experts",
                str(moved / "loras"),
                "--bucket",
                str(tmp_path / "refused"),
            ]
        )
        == 2
    )
    assert "one deployment serves one base" in capsys.readouterr().err
    # ... and a deployment assembled by hand fails to load with the same message
    experts = {n: str(moved / f"loras/{n}/adapter") for n in NAMES}
    label_map = json.loads((moved / "label_map.json").read_text())
    deploy(str(moved / "routing/adapter"), experts, label_map, str(tmp_path / "by-hand"))
    assert (
        main(["--workdir", str(tmp_path), "infer", "--deployment", str(tmp_path / "by-hand"), *request]) == 2
    )
    assert "one deployment serves one base" in capsys.readouterr().err


def _conflicting_copy(data: Path, out: Path, label_map: dict) -> Path:
    """Every test record twice, under its expert and under another: at most one of each pair is right."""
    names = sorted(label_map, key=label_map.get)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] != "test":
            continue
        other = names[(names.index(rec["expert"]) + 1) % len(names)]
        lines += [json.dumps(rec), json.dumps({**rec, "id": rec["id"] + "#other", "expert": other})]
    out.write_text("\n".join(lines) + "\n")
    for img in (data.parent / "images").iterdir():  # image paths are relative to the JSONL's folder
        (out.parent / "images").mkdir(exist_ok=True)
        (out.parent / "images" / img.name).write_bytes(img.read_bytes())
    return out


def test_router_quick_test_exit_codes(wd, tmp_path, capsys):
    ckpt, data = wd / "checkpoints/router", wd / "data/routing/routing_data.jsonl"
    test = ["--workdir", str(tmp_path), "test", "router", "--checkpoint", str(ckpt)]
    # 0: every test record (per-expert cap above the count); the figures are eval router's recalls
    assert main([*test, "--test-data", str(data), "--per-expert", "100", "--min-accuracy", "0"]) == 0
    table = capsys.readouterr().out
    report = json.loads((wd / "eval/report.json").read_text())
    for name, m in report["per_expert"].items():
        row = next(line.split() for line in table.splitlines() if line.startswith(name + " "))
        assert row == [name, str(m["support"]), str(round(m["recall"] * m["support"])), f"{m['recall']:.3f}"]
    assert f"PASS: accuracy {report['accuracy']:.3f} >= --min-accuracy 0" in table
    # 1: half of the records carry a label that contradicts its twin's
    conflicting = _conflicting_copy(
        data, tmp_path / "conflict/r.jsonl", json.loads((ckpt / "adapter/label_map.json").read_text())
    )
    assert main([*test, "--test-data", str(conflicting), "--per-expert", "100", "--min-accuracy", "0.6"]) == 1
    assert "FAIL: accuracy" in capsys.readouterr().out
    # 2: user errors
    assert main([*test, "--test-data", str(tmp_path / "missing.jsonl")]) == 2
    bad = conflicting.parent / "bad.jsonl"  # beside the copied images
    bad.write_text(data.read_text().replace('"expert": "ocr"', '"expert": "weather"'))
    assert main([*test, "--test-data", str(bad)]) == 2
    assert "expert 'weather' is not in the router's label map" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*test, "--test-data", str(data), "--min-accuracy", "1.5"])
    assert exc.value.code == 2


def test_deploy_refuses_a_router_below_min_accuracy_unless_forced(wd, tmp_path, capsys):
    import shutil

    ckpt, data = wd / "checkpoints/router", wd / "data/routing/routing_data.jsonl"

    def deploy(checkpoint, dest, *extra):
        args = ["--checkpoint", str(checkpoint), "--experts", str(wd / "checkpoints/experts")]
        return main(["--workdir", str(tmp_path), "deploy", *args, "--bucket", str(tmp_path / dest), *extra])

    # a real evaluation of this router that is at most 0.5 right
    conflicting = _conflicting_copy(
        data, tmp_path / "conflict/r.jsonl", json.loads((ckpt / "adapter/label_map.json").read_text())
    )
    low = tmp_path / "low.json"
    mole(
        tmp_path,
        "eval",
        "router",
        "--checkpoint",
        str(ckpt),
        "--test-data",
        str(conflicting),
        "--output",
        str(low),
    )
    accuracy = json.loads(low.read_text())["accuracy"]
    assert accuracy <= 0.5
    assert deploy(ckpt, "refused", "--min-accuracy", "0.6", "--eval-report", str(low)) == 1
    assert "below --min-accuracy 0.6; not deployed (pass --force" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert deploy(ckpt, "forced", "--min-accuracy", "0.6", "--eval-report", str(low), "--force") == 0
    assert "deployed anyway (--force)" in capsys.readouterr().out
    forced = json.loads((tmp_path / "forced/CURRENT").read_text())["release"]
    manifest = json.loads((tmp_path / "forced/releases" / forced / "manifest.json").read_text())
    assert manifest["router_evaluation"]["figures"]["accuracy"] == accuracy  # the figures of that report
    assert deploy(ckpt, "low-ok", "--min-accuracy", str(accuracy), "--eval-report", str(low)) == 0

    # no report beside the checkpoint: router_info.json's validation accuracy is the recorded one
    val = json.loads((ckpt / "router_info.json").read_text())["best"]["val_accuracy"]
    assert deploy(ckpt, "by-val", "--min-accuracy", str(val)) == 0
    assert "validation accuracy" in capsys.readouterr().out
    if val < 1:
        assert deploy(ckpt, "by-val-2", "--min-accuracy", str(min(1.0, val + 0.001))) == 1

    # a report beside the checkpoint counts only for the weights it evaluated
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    shutil.copy(low, copy / "eval_report.json")
    assert deploy(copy, "beside", "--min-accuracy", "0.6") == 1
    assert str(copy / "eval_report.json") in capsys.readouterr().err
    with (copy / "adapter/adapter_model.safetensors").open("ab") as fh:
        fh.write(b"\0")  # other weights: the report no longer describes them
    assert deploy(copy, "stale", "--min-accuracy", "0.6", "--eval-report", str(low)) == 2
    assert "not of the router weights" in capsys.readouterr().err
    if val >= 0.6:  # falls back to router_info.json
        assert deploy(copy, "stale-fallback", "--min-accuracy", "0.6") == 0

    # nothing recorded at all (the bare adapter folder): refused unless forced
    bare = tmp_path / "bare"
    shutil.copytree(ckpt / "adapter", bare / "adapter")
    assert deploy(bare, "bare", "--min-accuracy", "0.1") == 2
    assert "no recorded evaluation of this router" in capsys.readouterr().err
    assert deploy(bare, "bare", "--min-accuracy", "0.1", "--force") == 0
    assert deploy(bare, "plain", "--eval-report", str(low)) == 2  # --eval-report needs --min-accuracy
