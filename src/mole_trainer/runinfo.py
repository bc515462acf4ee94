"""What a run records about where it ran: the code's git commit and dirty flag, the device, the cost.

The cost estimate is wall hours x devices x the price per device hour of configs/prices.yaml (Modal's
list prices by default), overridden per key by WORKDIR/config/prices.yaml. A GPU the table does not
list gets no cost; a CPU-only run is priced per core it may use.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .version import __version__

PRICES_FILE = "prices.yaml"
GIT_COMMIT_ENV = (
    "MOLE_GIT_COMMIT"  # set where the source has no .git (a Modal image): "<sha>" or "<sha>-dirty"
)
GIT_TIMEOUT_S = 5.0
CPU = "cpu"


@functools.cache
def git_state(source: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package; (None, None) outside a git checkout.

    Dirty means tracked files differ from the commit (untracked files, e.g. run outputs, do not count).
    """
    env = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if env:
        return env.removesuffix("-dirty"), env.endswith("-dirty")
    cwd = source or str(Path(__file__).resolve().parent)
    try:
        # the package must be tracked there: a copy installed into some repository's .venv is not its code
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", "__init__.py"],
            cwd=cwd,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
        )
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
        if tracked.returncode != 0 or commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return commit.stdout.strip(), dirty


def code_version() -> dict:
    """{"package", "git_commit", "git_dirty"} of the running code (git fields from git_state)."""
    commit, dirty = git_state()
    return {"package": __version__, "git_commit": commit, "git_dirty": dirty}


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_device() -> tuple[str, int]:
    """(device name, count) this process computed on: a CUDA GPU it initialised, else CPU and its cores.

    torch is only looked at when the run already imported it (a data stage never pays for the import).
    Under torchrun rank 0 records the run: the count is the world size (one GPU per process).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_name(torch.cuda.current_device()), int(os.environ.get("WORLD_SIZE", "1"))
    return CPU, _cpu_cores()


def load_prices(workdir: str | Path | None = None) -> dict:
    """The price table: the packaged default with WORKDIR/config/prices.yaml's entries over it."""
    import yaml

    from .configs import default_text

    table = yaml.safe_load(default_text(PRICES_FILE))
    override = Path(workdir) / "config" / PRICES_FILE if workdir is not None else None
    if override is not None and override.is_file():
        try:
            user = yaml.safe_load(override.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{override}: not valid YAML ({exc})") from None
        if not isinstance(user, dict):
            raise UserError(f"{override}: expected a mapping with gpu_per_hour and/or cpu_core_per_hour")
        for key, value in user.items():
            if key == "gpu_per_hour" and isinstance(value, dict):
                for gpu, price in value.items():
                    table["gpu_per_hour"][str(gpu)] = _price(price, override, f"gpu_per_hour.{gpu}")
            elif key == "cpu_core_per_hour":
                table[key] = _price(value, override, key)
            else:
                raise UserError(
                    f"{override}: {key}: expected gpu_per_hour (a mapping of GPU name to USD per hour) "
                    "or cpu_core_per_hour (a number)"
                )
    return table


def _price(value, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UserError(f"{path}: {key}: expected a price in USD per hour (a number >= 0), got {value!r}")
    return float(value)


def price_key(device: str, prices: dict) -> str | None:
    """The table key a device name matches: 'NVIDIA H100 80GB HBM3' -> 'H100'; None when none does.

    Longer keys are tried first ('L40S' before 'L4', 'A100-80GB' before 'A10'); an A100's memory size
    is part of its key, so an 'A100-SXM4-80GB' matches 'A100-80GB' and a 40 GB one matches nothing
    unless the table lists 'A100-40GB'.
    """
    if device == CPU:
        return CPU
    name = device.upper().replace(" ", "-")
    for key in sorted(prices.get("gpu_per_hour", {}), key=len, reverse=True):
        parts = key.upper().split("-")
        if parts[0] in name.split("-") and all(p in name for p in parts[1:]):
            return key
    return None


def hourly_rate(device: str, count: int, prices: dict) -> float | None:
    """USD per wall hour of `count` devices named `device`; None when the table has no price for it."""
    key = price_key(device, prices)
    if key == CPU:
        return prices.get("cpu_core_per_hour", 0.0) * count
    if key is None:
        return None
    return prices["gpu_per_hour"][key] * count


def device_label(device: str, count: int, prices: dict) -> str:
    """How a run's device is recorded: the price table's name for it (else the device's own), ':count'."""
    return f"{price_key(device, prices) or device}:{count}"
