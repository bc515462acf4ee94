"""`mole serve` settings and start-up errors: exit 2 with a message, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mole_trainer.cli import main
from mole_trainer.errors import UserError
from mole_trainer.serve.settings import serve_settings


def test_settings_file_paths_resolve_against_its_folder_and_options_override(tmp_path):
    cfg = tmp_path / "conf" / "serve.yaml"
    cfg.parent.mkdir()
    cfg.write_text("deployment: ../deploy\nallow_files: shots\nmax_batch: 4\nmax_wait_ms: 5\n")
    s = serve_settings(cfg, max_batch=16, fallback=None)
    assert Path(s.deployment) == tmp_path / "deploy" and Path(s.allow_files) == cfg.parent / "shots"
    assert (s.max_batch, s.max_wait_ms) == (16, 5.0)
    assert serve_settings(cfg, resolve=False).deployment == "../deploy"  # Modal: relative to a Volume
    assert serve_settings(cfg, deployment="s3://b/d").deployment == "s3://b/d"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"min_probability": 0.5}, "give min_probability and fallback together"),
        ({"max_wait_ms": -1.0}, "max_wait_ms: must be >= 0"),
        ({"max_images": 0}, "max_images: must be >= 1"),
    ],
)
def test_bad_settings_name_the_key(overrides, words):
    with pytest.raises(UserError, match=words):
        serve_settings(None, deployment="d", **overrides)


def test_cli_errors_exit_2_without_loading_a_model(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "serve"]) == 2
    assert "serve needs --deployment" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path), "serve", "--deployment", "d", "--min-probability", "0.4"]) == 2
    assert "fallback" in capsys.readouterr().err
    args = ["--workdir", str(tmp_path), "serve", "--deployment", "d", "--allow-files", str(tmp_path / "nope")]
    assert main(args) == 2
    assert "not a folder" in capsys.readouterr().err
