"""load_base gives the model its class builds, and no test leaves torch in a state that changes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_loaded_base_computes_its_rotary_frequencies(tiny_model):
    """RoPE's inverse frequencies are buffers kept out of the weight files: from_pretrained must compute
    them after loading, equal to those of the class built straight from the config (not left as the
    uninitialised memory it allocates for them)."""
    import torch

    from mole_trainer.model.loading import load_base

    base = load_base(str(tiny_model), "float32", "cpu")
    with torch.random.fork_rng(devices=[]):  # building draws random weights: later tests see the RNG unmoved
        built = dict(type(base)(base.config).named_buffers())
    loaded = dict(base.named_buffers())
    assert "model.language_model.rotary_emb.inv_freq" in loaded and loaded.keys() == built.keys()
    assert all(torch.equal(loaded[name], built[name]) for name in built), [
        name for name in built if not torch.equal(loaded[name], built[name])
    ]


@pytest.mark.slow
def test_the_host_read_spies_leave_later_loaded_bases_intact(tmp_path):
    """The concurrent loop's spy test first, in a fresh process where its model load is the process's
    first, then a load: a spy that replaces torch.tensor or torch.zeros gets captured by torch's cached
    set of the factories that `with torch.device("meta")` redirects, and every later from_pretrained
    then leaves the rotary buffers uninitialised (later trainings' losses change with the test order)."""
    spied = "tests/unit/test_concurrent_loop.py::test_the_host_reads_losses_only_at_log_steps"
    probe = "tests/unit/test_base_loading.py::test_a_loaded_base_computes_its_rotary_frequencies"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}"]
    out = subprocess.run([*cmd, spied, probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
