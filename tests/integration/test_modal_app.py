"""The Modal app without credentials: every stage function through `.local()` on the tiny model, with
MOLE_MODAL_ROOT standing in for the Volumes; the path helper; the image's package list; `.remote()`."""

from __future__ import annotations

import inspect
import json
import os
import time
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("modal")
# .local() warns that Volumes are not mounted: MOLE_MODAL_ROOT stands in for them on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")

from mole_trainer.cloud import modal_app as m  # noqa: E402
from mole_trainer.errors import UserError  # noqa: E402
from mole_trainer.layout import HISTORY_DB, MANIFEST_FILE  # noqa: E402
from tests.modal_spy import define_app  # noqa: E402

COUNTS = {"train": 12, "val": 4, "test": 4}
IMAGE_SIZE = (320, 240)
PIXELS = {"min_pixels": 4096, "max_pixels": 20000}
TRAIN = {"lr": 0.002, "steps": 3, "batch_size": 2, "eval_every": 3, "seed": 0}


def _write_configs(config_dir: Path, experts: list[str]) -> None:
    """Tiny dataset/loras/router configs in the data Volume, in the layout of the module docstring."""
    config_dir.mkdir(parents=True, exist_ok=True)
    dataset = {
        "experts": {e: {"path": f"../{m.EXPERTS_DATA}/{e}"} for e in experts},
        "train_per_expert": COUNTS["train"],
        "val_per_expert": COUNTS["val"],
        "test_per_expert": COUNTS["test"],
        "seed": 0,
    }
    model = f"../../{m.MODELS}/{m.TINY_MODEL}"
    loras = {
        "base_model": model,
        "output_dir": f"../../{m.CHECKPOINTS}/{m.EXPERTS_CKPT}",
        "image": PIXELS,
        "lora": {"rank": 4, "alpha": 8},
        "train": TRAIN,
        "eval_records": 2,
        "experts": {e: {"data": f"../{m.EXPERTS_DATA}/{e}", "max_new_tokens": 4} for e in experts},
    }
    router = {
        "base_model": model,
        "output_dir": f"../../{m.CHECKPOINTS}/{m.ROUTER_CKPT}",
        "image": PIXELS,
        "lora": {"rank": 4, "alpha": 8},
        "train": TRAIN,
        "eval_max_records": 8,
    }
    for name, cfg in (("dataset.yaml", dataset), ("loras.yaml", loras), ("router.yaml", router)):
        (config_dir / name).write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A fresh folder as MOLE_MODAL_ROOT, with torch on one thread, for the module's stage runs."""
    import torch

    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine two OpenMP threads wait on each other (a 30x slowdown seen)
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(m.LOCAL_ROOT_ENV, str(tmp_path_factory.mktemp("volumes")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Path(os.environ[m.LOCAL_ROOT_ENV])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(volumes):
    """{stage: result} of one run of every stage function in pipeline order."""
    out = {"model": m.model_tiny.local()}
    out["synth"] = m.data_synth.local(**COUNTS, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1])
    _write_configs(volumes / m.DATA / m.CONFIG_DIR, list(out["synth"]))
    out["routing"] = m.data_routing.local()
    out["check"] = m.data_check.local()
    out["prep"] = m.data_preprocess.local(**PIXELS, workers=2)
    out["experts"] = m.train_experts.local()
    out["router"] = m.train_router.local()
    out["eval"] = m.eval_router.local(batch_size=4)
    out["test_router"] = m.test_router.local(per_expert=2, min_accuracy=0.0)
    out["deploy"] = m.deploy.local(min_accuracy=out["eval"]["accuracy"])
    return out


@pytest.mark.slow
def test_every_stage_runs_locally_on_the_volume_layout(volumes, pipeline):
    root, out = volumes, pipeline
    assert out["model"]["model"] == str(root / m.MODELS / m.TINY_MODEL)
    experts = sorted(out["synth"])
    assert (root / m.DATA / m.ROUTING_FILE).is_file()
    assert out["routing"]["records"] == len(experts) * sum(COUNTS.values())
    assert out["check"]["records"] == out["routing"]["records"] and not out["check"]["violations"]
    for name in experts:
        adapter = root / m.CHECKPOINTS / m.EXPERTS_CKPT / name / "adapter"
        assert out["experts"][name]["adapter"] == str(adapter)
        assert (adapter / "adapter_config.json").is_file()
    assert (Path(out["router"]["adapter"]) / "adapter_config.json").is_file()
    report = json.loads((root / m.CHECKPOINTS / m.EVAL_REPORT).read_text())
    assert report["n"] == len(experts) * COUNTS["test"]
    matrix = report["confusion"]["matrix"]  # rows: the true expert, each with its test records
    assert [sum(row) for row in matrix] == [COUNTS["test"]] * len(experts)
    assert report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(experts))) / report["n"])
    assert out["deploy"]["router_gate"]["accuracy"] == report["accuracy"]
    assert out["test_router"]["passed"] and out["test_router"]["n"] == 2 * len(experts)
    assert out["deploy"]["router_gate"]["source"] == str(root / m.CHECKPOINTS / m.EVAL_REPORT)
    deployed = root / m.CHECKPOINTS / m.DEPLOY_DIR
    release = json.loads((deployed / "CURRENT").read_text())["release"]
    assert out["deploy"]["release"] == release
    manifest = json.loads((deployed / "releases" / release / MANIFEST_FILE).read_text())
    assert sorted(manifest["experts"]) == experts
    assert (root / m.CHECKPOINTS / HISTORY_DB).is_file()


@pytest.mark.slow
def test_fanout_containers_write_history_files_of_their_own_and_the_history_merges_them(
    volumes, pipeline, monkeypatch
):
    from mole_trainer.history_view import read_history
    from mole_trainer.layout import HISTORY_DIR, LOCK_SHARED_ENV

    # .starmap needs Modal: run each call in-process, as its container would (with the image's env)
    monkeypatch.setenv(LOCK_SHARED_ENV, "1")
    monkeypatch.setattr(m.train_experts, "starmap", lambda calls: [m.train_experts.local(*c) for c in calls])
    workdir = volumes / m.CHECKPOINTS
    before = {r["run_id"] for r in read_history(workdir).runs}
    results = m.train_expert_fanout.local()
    assert sorted(results) == sorted(pipeline["synth"])
    assert len(list((workdir / HISTORY_DIR).glob("*.jsonl"))) >= len(results)  # one file per writer
    new = [r for r in read_history(workdir).runs if r["run_id"] not in before]
    assert sorted(name for r in new for name in r["artifacts"]) == sorted(results)
    assert all(r["stage"] == "train.experts" and r["status"] == "ok" for r in new)


@pytest.mark.slow
def test_a_retried_training_resumes_from_its_checkpoint_on_the_volume(pipeline):
    # Modal retries call the function again: it continues from the Volume instead of starting over
    first = pipeline["router"]
    again = m.train_router.local()
    assert first["resumed_from"] == 0
    assert again["resumed_from"] == again["steps"] == first["steps"] and again["best"] == first["best"]


def test_volume_paths_stay_inside_their_volume(monkeypatch, tmp_path):
    monkeypatch.delenv(m.LOCAL_ROOT_ENV, raising=False)
    assert m.volume_path(m.DATA, "config/loras.yaml") == Path("/vol/data/config/loras.yaml")
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    assert m.volume_path(m.CHECKPOINTS, ".") == tmp_path / m.CHECKPOINTS
    for bad in ("../models/x", "a/../../b", "/etc/passwd", "/vol/data/x"):
        with pytest.raises(UserError, match="relative"):
            m.volume_path(m.DATA, bad)


def test_remote_without_credentials_fails_at_once():
    from modal.exception import ExecutionError

    start = time.perf_counter()
    with pytest.raises(ExecutionError, match="not been hydrated .* App it is defined on is not running"):
        m.model_tiny.remote()
    assert time.perf_counter() - start < 10


@pytest.fixture(scope="module")
def default_app() -> dict:
    """APP_SPY's record of the app defined without MOLE_MODAL_CONFIG."""
    return define_app({k: v for k, v in os.environ.items() if k != m.MODAL_CONFIG_ENV})


def test_image_installs_exactly_the_pyproject_dependencies(default_app):
    root = Path(__file__).parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    calls = default_app
    assert len(calls["pip_install"]) == 1
    assert sorted(calls["pip_install"][0]) == sorted(pyproject["project"]["dependencies"])
    assert calls["env"]["HF_HOME"] == m.HF_HOME


def test_a_user_error_is_returned_not_raised_so_modal_does_not_retry_it(monkeypatch, tmp_path, capsys):
    """Modal retries whatever a function raises: a config error comes back as a result instead."""
    from mole_trainer.locking import LockHeld

    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    result = m.train_router.local(config="config/missing.yaml")  # the real stage, on an empty Volume
    assert result["ok"] is False and result["stage"] == "train_router"
    assert str(tmp_path / m.DATA) in result["error"] and "not found" in result["error"]
    with pytest.raises(SystemExit) as exit_info:
        m.checked(result)  # what the `main` entrypoint does with each result
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: train_router: {result['error']}\n")
    assert m.checked({"adapter": "x"}) == {"adapter": "x"}

    # anything else still raises, so Modal retries it: a crash, or a lock a pre-empted attempt still holds
    for exc in (RuntimeError("CUDA error: an illegal memory access"), LockHeld("locked by another run")):

        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(m.stages, "train_router", fail)
        with pytest.raises(type(exc)):
            m.train_router.local()


def test_a_fanout_reports_the_user_errors_of_its_experts(monkeypatch, tmp_path):
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    _write_configs(tmp_path / m.DATA / m.CONFIG_DIR, ["calendar", "ocr"])
    monkeypatch.setattr(m.train_experts, "starmap", lambda calls: [m.train_experts.local(*c) for c in calls])
    result = m.train_expert_fanout.local()  # no expert data on the Volume: each expert's call fails
    assert m.failed(result) and result["error"].startswith("calendar: ") and "; ocr: " in result["error"]


class RecordingVolume:
    """A Volume stand-in: records, at each commit, the newest checkpoint folder on it."""

    def __init__(self, root: Path):
        self.root, self.commits = root, []

    def reload(self) -> None:
        pass

    def commit(self) -> None:
        folders = sorted(self.root.rglob("step-*"))
        self.commits.append(folders[-1].name if folders else None)
        assert not list(self.root.rglob(".step-*.tmp")), "committed in the middle of a save"


def test_every_checkpoint_save_commits_the_volume_at_once(monkeypatch, tmp_path, capsys):
    from pathlib import PurePosixPath

    import torch

    from mole_trainer.train import checkpoint as ckpt

    monkeypatch.delenv(m.LOCAL_ROOT_ENV, raising=False)  # "mounted": the Volumes are used
    monkeypatch.setattr(m, "MOUNT_ROOT", PurePosixPath(tmp_path))
    volumes = {kind: RecordingVolume(tmp_path / kind) for kind in m.VOLUME_NAMES}
    monkeypatch.setattr(m, "VOLUMES", volumes)
    root = m.volume_path(m.CHECKPOINTS, "router/checkpoints")
    assert root == tmp_path / m.CHECKPOINTS / "router/checkpoints"
    commits = volumes[m.CHECKPOINTS].commits
    with m.synced(reads=(m.DATA,), writes=(m.CHECKPOINTS,)):
        for step in (1, 2, 3):
            ckpt.save_checkpoint(root, step, {"w": torch.zeros(2)}, {"step": step}, keep=2)
            assert commits[-1] == f"step-{step:08d}"  # committed before training goes on
    assert commits == ["step-00000001", "step-00000002", "step-00000003", "step-00000003"]  # + the final one
    assert volumes[m.DATA].commits == []  # read only
    ckpt.save_checkpoint(root, 4, {"w": torch.zeros(2)}, {"step": 4}, keep=2)
    assert len(commits) == 4, "outside a stage function, nothing is committed"

    def refused() -> None:
        raise RuntimeError("there are open files preventing the operation")

    monkeypatch.setattr(volumes[m.CHECKPOINTS], "commit", refused)
    with m.synced():
        ckpt.save_checkpoint(root, 5, {"w": torch.zeros(2)}, {"step": 5}, keep=2)  # training goes on
    assert "step-00000005: Volume commit failed (RuntimeError: there are open" in capsys.readouterr().err


def _without_cpu(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k != "cpu"}


def test_every_stage_function_is_defined_with_its_row_of_the_resource_table(default_app):
    functions, table = default_app["functions"], default_app["table"]
    assert sorted(table) == sorted(m.STAGE_DEFAULTS)
    assert sorted(functions) == sorted([*m.STAGE_DEFAULTS, "web"])
    for name in m.STAGE_DEFAULTS:  # one source: each decorator takes its stage's row, nothing else
        assert _without_cpu(functions[name]) == table[name], name
    # today's values (STAGE_DEFAULTS), as the functions were created
    train = {"gpu": "H100", "timeout": 6 * 3600, "retries": [2, 2.0, 30.0]}
    assert functions["train_router"] == functions["train_experts"] == train
    for name in ("eval_router", "test_router"):
        assert functions[name] == {"gpu": "L40S", "timeout": 2 * 3600, "retries": None}
    assert functions["data_preprocess"] == {"gpu": None, "timeout": 3600, "retries": None, "cpu": 8}
    for name in ("model_tiny", "data_synth", "data_routing", "data_check", "deploy"):
        assert functions[name] == {"gpu": None, "timeout": 3600, "retries": None}
    assert functions["train_expert_fanout"] == {"gpu": None, "timeout": 24 * 3600, "retries": None}


def test_stage_resources_follow_the_modal_config(tmp_path, default_app):
    path = tmp_path / "modal.yaml"
    stages = {
        "train_router": {"gpu": "H200", "gpu_count": 2, "timeout_s": 600, "retries": 0},
        "eval_router": {"gpu": "none"},
        "data_check": {"retries": 3},
    }
    path.write_text(yaml.safe_dump({"stages": stages}))
    got = define_app({**os.environ, m.MODAL_CONFIG_ENV: str(path)})
    functions = got["functions"]
    assert got["table"]["train_router"] == functions["train_router"]
    assert functions["train_router"] == {"gpu": "H200:2", "timeout": 600, "retries": None}
    assert functions["train_experts"] == default_app["functions"]["train_experts"]  # not named: today's
    assert functions["eval_router"] == {"gpu": None, "timeout": 2 * 3600, "retries": None}
    assert functions["data_check"] == {"gpu": None, "timeout": 3600, "retries": [3, 2.0, 30.0]}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            {"train_routr": {"gpu": "H200"}},
            "unknown stage 'stages.train_routr'; the Modal app has model_tiny",
        ),
        ({"train_router": {"gpu": "H100:2"}}, "stages.train_router.gpu: expected a GPU type such as H100"),
        ({"train_router": {"retries": 11}}, "stages.train_router.retries: must be between 0 and 10"),
        ({"train_router": {"timeout_s": "6h"}}, "stages.train_router.timeout_s: expected an integer"),
    ],
)
def test_a_bad_modal_config_names_the_file_and_key(tmp_path, stages, message):
    path = tmp_path / "modal.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(UserError, match=f"^{path}: ") as err:
        m.stage_resources(path)
    assert message in str(err.value)


def test_the_pipeline_entrypoint_stops_on_a_broken_config_with_exit_2_before_uploading(tmp_path, capsys):
    config_dir = tmp_path / "configs"
    _write_configs(config_dir, ["calendar"])
    router = yaml.safe_load((config_dir / "router.yaml").read_text())
    router["train"]["lr"] = "fast"
    (config_dir / "router.yaml").write_text(yaml.safe_dump(router))
    # the upload would raise (the Volume is not hydrated here): the configs are checked before it
    with pytest.raises(SystemExit) as exit_info:
        m.main("--config-dir", str(config_dir))
    assert exit_info.value.code == 2
    want = f"error: {config_dir / 'router.yaml'}: train.lr: expected a number, got a string 'fast'\n"
    assert capsys.readouterr().err == want  # the message alone, no traceback
    (config_dir / "loras.yaml").unlink()
    with pytest.raises(SystemExit) as exit_info:
        m.main("--config-dir", str(config_dir))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {config_dir / 'loras.yaml'}: config file not found\n"


def test_a_stage_run_through_the_entrypoint_exits_2_on_a_user_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(m.train_router, "remote", m.train_router.local)  # .remote needs a Modal token
    with pytest.raises(SystemExit) as exit_info:
        m.main("train_router", "--config", "config/missing.yaml", "--no-resume")
    assert exit_info.value.code == 2
    missing = tmp_path / m.DATA / "config" / "missing.yaml"
    assert capsys.readouterr().err.endswith(f"error: train_router: {missing}: config file not found\n")

    with pytest.raises(SystemExit) as exit_info:
        m.main("train_routr")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: 'train_routr': unknown stage; expected one of model_tiny"
    )


def test_a_stage_run_through_the_entrypoint_prints_its_result(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(m.LOCAL_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(m.data_synth, "remote", m.data_synth.local)
    m.main(
        "data_synth", "--experts", "calendar", "--train", "2", "--val", "1", "--test", "1", "--width", "320"
    )
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["calendar"]
    records = (tmp_path / m.DATA / m.EXPERTS_DATA / "calendar" / "train.jsonl").read_text().splitlines()
    assert len(records) == 2  # --train 2 reached the stage as an int


def test_the_entrypoint_takes_the_options_modal_run_gives_a_stage(capsys):
    name, kwargs = m.stage_call(
        ["eval_router", "--batch-size", "4", "--split", "val", "--test-data", "r.jsonl"]
    )
    assert name == "eval_router"
    assert kwargs == {
        "checkpoint": "router",  # the function's own defaults for the rest
        "test_data": "r.jsonl",
        "output": "eval/router_report.json",
        "split": "val",
        "batch_size": 4,
        "workdir": ".",
    }
    for stage in m.STAGE_DEFAULTS:  # every stage parses with no option: its defaults are the function's
        params = inspect.signature(m.STAGE_CODE[stage]).parameters
        assert m.stage_call([stage])[1] == {k: p.default for k, p in params.items()}
    assert m.stage_call(["train_experts", "--no-resume"])[1]["resume"] is False
    assert m.stage_call(["train_experts"])[1]["resume"] is True
    with pytest.raises(SystemExit) as exit_info:
        m.stage_call(["eval_router", "--batch-size", "four"])
    assert exit_info.value.code == 2
    assert "argument --batch-size: invalid int value: 'four'" in capsys.readouterr().err
