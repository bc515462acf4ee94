"""`mole data preprocess --config`: the base model and pixel budget come from a router.yaml or a loras.yaml,
whatever the input (an expert dataset or a routing JSONL)."""

import json

import pytest

from mole_trainer.cli import main
from mole_trainer.config import LorasConfig, RouterConfig, load_model_config
from mole_trainer.errors import UserError


def test_expert_dataset_preprocessed_with_router_yaml(tmp_path, tiny_model, synth_data, capsys):
    # router.yaml has router-only keys (eval_max_records, class_balanced) that loras.yaml rejects
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        f"base_model: {tiny_model}\nimage: {{min_pixels: 4096, max_pixels: 20000}}\n"
        "eval_max_records: 8\nclass_balanced: false\n"
    )
    out = tmp_path / "prep"
    args = ["--workdir", str(tmp_path), "data", "preprocess", "--input", str(synth_data / "calendar")]
    assert main([*args, "--output", str(out), "--config", str(cfg)]) == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "sft" and meta["model"] == str(tiny_model)
    assert (meta["min_pixels"], meta["max_pixels"]) == (4096, 20000)


def test_model_config_told_apart_by_its_own_keys(tmp_path):
    router = tmp_path / "router.yaml"
    router.write_text("base_model: m\neval_max_records: 4\nimage: {max_pixels: 9000}\n")
    loras = tmp_path / "loras.yaml"
    loras.write_text("base_model: m\nexperts: {a: {data: d}}\nimage: {max_pixels: 8000}\n")
    assert isinstance(load_model_config(router), RouterConfig)
    assert load_model_config(router).image.max_pixels == 9000
    assert isinstance(load_model_config(loras), LorasConfig)
    assert load_model_config(loras).image.max_pixels == 8000
    both = tmp_path / "both.yaml"
    both.write_text("base_model: m\nexperts: {}\neval_max_records: 4\n")
    with pytest.raises(UserError, match="mixes loras.yaml keys \\(experts\\) and router.yaml keys"):
        load_model_config(both)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base_model: m\nimage: {max_pixel: 9000}\n")
    with pytest.raises(UserError, match="unknown key 'image.max_pixel'"):
        load_model_config(typo)
