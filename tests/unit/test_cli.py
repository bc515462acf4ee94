"""The `mole` command itself: start-up without heavy imports, help, and user errors (exit 2, no traceback)."""

import json
import subprocess
import sys
import time

import pytest

from mole_trainer.cli import build_parser, main

STAGES = ["demo", "init", "model", "data", "train", "eval", "test", "deploy", "infer", "history"]


def run_mole(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mole_trainer.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_every_stage_without_importing_torch():
    code = (
        "import sys, contextlib, io\nfrom mole_trainer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(out.getvalue())\nprint('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert "HEAVY []" in res.stdout
    for stage in STAGES:
        assert stage in res.stdout
    assert elapsed < 10  # generous for a loaded CI machine; the real figure is ~0.1 s


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["data", "routing", "--config", "missing.yaml", "--output", "x.jsonl"],
            "missing.yaml: config file not found",
        ),
        (
            ["train", "router", "--dataset-path", "nowhere", "--config", "missing.yaml"],
            "config file not found",
        ),
        (["eval", "router", "--checkpoint", "nowhere", "--test-data", "t.jsonl"], "t.jsonl: not found"),
        (["infer", "--deployment", "d"], "infer needs --image IMG --prompt TEXT"),
        (["data", "synth", "--out", "o", "--experts", "calendar,weather"], "weather"),
        (["data", "preprocess", "--input", "nothing", "--output", "o", "--model", "m"], "nothing: not found"),
        # a subprocess that imports transformers: seconds each
        pytest.param(
            ["model", "tiny", "--out", "o", "--processor", "nowhere"],
            "--processor nowhere: not a folder",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["model", "tiny", "--out", ".", "--processor", "."],
            "--out must not be the --processor folder",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, fragment):
    res = run_mole("--workdir", str(tmp_path), *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_jsonl_line_in_routing_config_names_file_and_line(tmp_path, synth_data):
    import shutil

    ds = tmp_path / "cal"
    shutil.copytree(synth_data / "calendar", ds)
    with (ds / "train.jsonl").open("a") as fh:
        fh.write("{broken\n")
    n = len((ds / "train.jsonl").read_text().splitlines())
    cfg = tmp_path / "dataset.yaml"
    cfg.write_text(f"experts:\n  calendar: {{path: {ds}}}\n")
    res = run_mole(
        "--workdir",
        str(tmp_path),
        "data",
        "routing",
        "--config",
        str(cfg),
        "--output",
        str(tmp_path / "r.jsonl"),
    )
    assert res.returncode == 2 and f"train.jsonl:{n}: not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_config_key_via_cli(tmp_path):
    cfg = tmp_path / "dataset.yaml"
    cfg.write_text("experts: {}\ntest_per_exprt: 3\n")
    res = run_mole(
        "--workdir",
        str(tmp_path),
        "data",
        "routing",
        "--config",
        str(cfg),
        "--output",
        "r.jsonl",
        cwd=tmp_path,
    )
    assert (
        res.returncode == 2
        and "unknown key 'test_per_exprt'" in res.stderr
        and "test_per_expert" in res.stderr
    )


def test_expert_without_data_and_undecodable_image(tmp_path, synth_data):
    import shutil

    cfg = tmp_path / "loras.yaml"
    cfg.write_text("base_model: model\nexperts:\n  calendar: {data: missing-folder}\n")
    res = run_mole("--workdir", str(tmp_path), "train", "experts", "--config", str(cfg))
    assert res.returncode == 2 and "experts.calendar.data" in res.stderr and "missing-folder" in res.stderr
    ds = tmp_path / "ocr"
    shutil.copytree(synth_data / "ocr", ds)
    first = json.loads((ds / "train.jsonl").read_text().splitlines()[0])
    (ds / first["images"][0]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "dataset.yaml").write_text(f"experts:\n  ocr: {{path: {ds}}}\n")
    res = run_mole(
        "--workdir",
        str(tmp_path),
        "data",
        "routing",
        "--config",
        str(tmp_path / "dataset.yaml"),
        "--output",
        str(tmp_path / "r.jsonl"),
    )
    assert res.returncode == 2 and "train.jsonl:1" in res.stderr and "cannot be decoded" in res.stderr
    assert "Traceback" not in res.stderr


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["data", "synth"])
    assert e.value.code == 2


def test_history_show_on_empty_workdir(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "history", "show"]) == 0
    assert "no runs recorded" in capsys.readouterr().out
    assert main(["--workdir", str(tmp_path), "history", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (tmp_path / "history.sqlite").exists()  # reading creates nothing


@pytest.mark.parametrize("preset", ["demo", "qwen3-vl-2b", "qwen3-vl-8b"])
def test_init_writes_valid_configs_for_every_preset(tmp_path, capsys, preset):
    from mole_trainer.config import DatasetConfig, LorasConfig, RouterConfig, load_config

    wd = tmp_path / "w"
    assert main(["init", "--workdir", str(wd), "--preset", preset]) == 0
    loras = load_config(wd / "config/loras.yaml", LorasConfig)
    router = load_config(wd / "config/router.yaml", RouterConfig)
    load_config(wd / "config/dataset.yaml", DatasetConfig)
    if preset != "demo":
        expected = {"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}[
            preset
        ]
        assert loras.base_model == router.base_model == expected
        assert loras.lora.rank >= 32 and router.image.max_pixels > 76800
        assert set(loras.experts) == {"calendar", "chart-screen", "login-window", "ocr"}
    assert main(["init", "--workdir", str(wd)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["init", "--workdir", str(wd), "--preset", "nope"]) == 2


def test_synth_help_states_the_synthesizers_defaults(capsys):
    from mole_trainer.data.synth import DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE

    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for split, n in DEFAULT_COUNTS.items():
        assert f"{split} records per expert ({n})" in text
    assert "({}x{})".format(*DEFAULT_IMAGE_SIZE) in text
