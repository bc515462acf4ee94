"""Records what the Modal app asks of public Modal API while it is defined (in a fresh interpreter, the
way `modal run` imports it): the image's packages and environment, and the options of each function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Spies on public Modal API (the modal.Image methods, the modal.App.function and modal.concurrent
# decorators), then imports the app the way `modal run` does and prints, as JSON: the packages the image
# was asked to install, the environment it sets, the resources each function was defined with (by the
# names of app.registered_functions), those of the app's OPTIONS table, and the concurrency asked for.
APP_SPY = """
import json, modal
calls = {"pip_install": [], "env": {}, "concurrent": []}
pip_install, env = modal.Image.pip_install, modal.Image.env
function, concurrent = modal.App.function, modal.concurrent
defined = {}  # id of each Modal function -> its resources

def spy_pip(self, *packages, **kw):
    calls["pip_install"].append(list(packages))
    return pip_install(self, *packages, **kw)

def spy_env(self, vars, *a, **kw):
    calls["env"].update(vars)
    return env(self, vars, *a, **kw)

EXTRA = ("cpu", "min_containers", "max_containers", "scaledown_window")

def resources(kw):
    r = kw.get("retries")
    retries = [r.max_retries, r.backoff_coefficient, r.initial_delay.total_seconds()] if r else None
    out = {"gpu": kw.get("gpu"), "timeout": kw.get("timeout"), "retries": retries}
    return {**out, **{k: kw[k] for k in EXTRA if k in kw}}

def spy_function(self, *a, **kw):
    decorate = function(self, *a, **kw)

    def record(f):
        out = decorate(f)
        defined[id(out)] = resources(kw)
        return out

    return record

def spy_concurrent(*a, **kw):
    calls["concurrent"].append(kw)
    return concurrent(*a, **kw)

modal.Image.pip_install, modal.Image.env = spy_pip, spy_env
modal.App.function, modal.concurrent = spy_function, spy_concurrent
from mole_trainer.cloud import modal_app
calls["functions"] = {name: defined[id(f)] for name, f in modal_app.app.registered_functions.items()}
calls["table"] = {name: resources(options) for name, options in modal_app.OPTIONS.items()}
print(json.dumps(calls))
"""


def define_app(env: dict[str, str]) -> dict:
    """What APP_SPY saw while the app was defined in a fresh interpreter with environment `env`."""
    out = subprocess.run([sys.executable, "-c", APP_SPY], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])
