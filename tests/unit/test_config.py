from pathlib import Path

import pytest

from mole_trainer.config import DatasetConfig, LorasConfig, RouterConfig, load_config
from mole_trainer.errors import UserError


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load_and_resolve_relative_to_their_folder():
    import mole_trainer.configs

    folder = Path(mole_trainer.configs.__file__).parent
    ds = load_config(folder / "dataset.yaml", DatasetConfig)
    assert set(ds.experts) == {"calendar", "chart-screen", "login-window", "ocr"}
    assert Path(ds.experts["ocr"].path) == (folder.parent / "data/experts/ocr").resolve()
    loras = load_config(folder / "loras.yaml", LorasConfig)
    assert set(loras.experts) == set(ds.experts)
    router = load_config(folder / "router.yaml", RouterConfig)
    assert router.train.steps > 0 and router.lora.rank > 0


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = write(tmp_path, "train:\n  stpes: 3\n")
    with pytest.raises(UserError) as e:
        load_config(p, RouterConfig)
    assert str(p) in str(e.value) and "train.stpes" in str(e.value) and "steps" in str(e.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  steps: ten\n", "train.steps: expected an integer"),
        ("train:\n  lr: [1]\n", "train.lr: expected a number"),
        ("lora:\n  targets: q_proj\n", "lora.targets: expected a list"),
        ("train: 5\n", "train: expected a mapping"),
        ("train:\n  steps: true\n", "train.steps: expected an integer"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        load_config(write(tmp_path, text), RouterConfig)


def test_float_accepts_yaml_exponent_string(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n"), RouterConfig)
    assert cfg.train.lr == pytest.approx(1e-3)


def test_hub_id_is_kept_and_local_paths_resolved(tmp_path):
    cfg = load_config(
        write(tmp_path, "base_model: Qwen/Qwen3-VL-8B-Instruct\noutput_dir: out\n"), RouterConfig
    )
    assert cfg.base_model == "Qwen/Qwen3-VL-8B-Instruct"
    assert cfg.output_dir == str((tmp_path / "out").resolve())


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", RouterConfig)
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"), RouterConfig)


def test_per_expert_overrides(tmp_path):
    text = "train: {steps: 5}\nexperts:\n  a1: {data: d, train: {steps: 9}}\n  b1: {data: d}\n"
    text = (
        "train: {steps: 5, lr: 0.003, batch_size: 8}\nlora: {rank: 32}\nexperts:\n"
        "  a1: {data: d, train: {steps: 9}, lora: {alpha: 8}}\n  b1: {data: d}\n"
    )
    cfg = load_config(write(tmp_path, text), LorasConfig)
    lora_a, train_a = cfg.resolved("a1")
    assert (train_a.steps, train_a.lr, train_a.batch_size) == (9, 0.003, 8)  # only steps overridden
    assert (lora_a.rank, lora_a.alpha) == (32, 8.0)
    assert cfg.resolved("b1")[1].steps == 5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train: {eval_every: 0}\n", "train.eval_every: must be >= 1"),
        ("train: {lr: 0}\n", "train.lr: must be > 0"),
        ("train: {schedule: linear}\n", "train.schedule: must be 'cosine' or 'constant'"),
        ("lora: {targets: [qkv]}\n", "lora.targets: unknown module(s) ['qkv']"),
        ("image: {min_pixels: 100, max_pixels: 10}\n", "image.max_pixels"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, text, fragment):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text), RouterConfig)
    assert fragment in str(e.value)
