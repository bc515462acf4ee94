"""The metadata file written beside every adapter we save (what a loader needs to use it right), and the
digest of an adapter's weights (what an evaluation report records it was made of)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserError
from .hashing import file_hashes_digest

ADAPTER_INFO_FILE = "mole_adapter.json"
ADAPTER_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def write_adapter_info(adapter_dir: str | Path, info: dict) -> None:
    """Write base model, role, pixel budget (and label map for a router) beside the adapter."""
    Path(adapter_dir, ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def find_adapter_dir(path: str | Path) -> Path:
    """The adapter folder of a checkpoint: `path` itself or `path/adapter`."""
    path = Path(path)
    for cand in (path, path / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise UserError(f"{path}: no PEFT adapter here (expected adapter_config.json in it or in adapter/)")


def adapter_digest(adapter_dir: str | Path) -> str:
    """sha256 over an adapter folder's weight files (names and bytes): which weights were evaluated."""
    files = sorted(p for p in Path(adapter_dir).iterdir() if p.suffix in ADAPTER_WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"{adapter_dir}: no adapter weights (*.safetensors or *.bin) in this folder")
    return file_hashes_digest(files)


def read_adapter_info(adapter_dir: str | Path, role: str | None = None) -> dict:
    """The mole_adapter.json of an adapter folder; with `role`, it must be that kind of adapter."""
    f = Path(adapter_dir) / ADAPTER_INFO_FILE
    if not f.is_file():
        raise UserError(f"{adapter_dir}: missing {ADAPTER_INFO_FILE} (was this adapter trained by mole?)")
    info = json.loads(f.read_text())
    if role is not None and info.get("role") != role:
        raise UserError(f"{adapter_dir}: this adapter is a '{info.get('role')}', expected a '{role}'")
    if role == "router":
        from .router_prompt import ROUTER_PROMPT_VERSION

        if info.get("prompt_version", 1) != ROUTER_PROMPT_VERSION:
            print(
                f"warning: {adapter_dir}: this router was trained on router prompt version "
                f"{info.get('prompt_version', 1)}, this mole builds version {ROUTER_PROMPT_VERSION} (the request "
                "is now read in lower case); its routes may differ from its recorded evaluation: retrain it",
                file=sys.stderr,
            )
    return info


def check_same_base(expert_info: dict, router_info: dict, where: str | Path) -> None:
    """Router and experts of one deployment must be adapters of the same base model."""
    if expert_info["base_model"] != router_info["base_model"]:
        raise UserError(
            f"{where}: expert '{expert_info.get('expert')}' was trained on {expert_info['base_model']}, the "
            f"router on {router_info['base_model']}; one deployment serves one base"
        )
