"""Default configs of the demo (copied into WORKDIR/config by `mole demo`), and variants of them."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

CONFIG_FILES = ("dataset.yaml", "loras.yaml", "router.yaml")


def default_text(name: str) -> str:
    """The packaged default config file `name` as text."""
    return resources.files(__name__).joinpath(name).read_text()


def presets() -> list[str]:
    """Names of the packaged presets (override files for real base models)."""
    folder = resources.files(__name__).joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_overrides(name: str) -> dict[str, dict]:
    """The per-file overrides of a preset ('demo' is the defaults themselves)."""
    import yaml

    from ..errors import UserError

    if name == "demo":
        return {}
    if name not in presets():
        raise UserError(f"unknown preset '{name}' (choose from demo, {', '.join(presets())})")
    return yaml.safe_load(resources.files(__name__).joinpath("presets", f"{name}.yaml").read_text())


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_configs(
    config_dir: str | Path,
    overrides: dict[str, dict] | None = None,
    every_expert: dict[str, dict] | None = None,
) -> None:
    """Write the default configs into `config_dir`, with per-file `overrides` merged in.

    `every_expert` maps a file name to settings merged into each of that file's `experts` entries
    (e.g. a smaller max_new_tokens for every expert of loras.yaml). Files written this way keep
    the defaults' relative paths, so they belong in WORKDIR/config like the demo's.
    """
    import yaml

    overrides, every_expert = overrides or {}, every_expert or {}
    folder = Path(config_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        data = merged(yaml.safe_load(default_text(name)), overrides.get(name, {}))
        if name in every_expert:
            data["experts"] = {e: merged(v, every_expert[name]) for e, v in data["experts"].items()}
        (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))


def init_workdir(workdir: str | Path, preset: str = "demo", force: bool = False) -> list[Path]:
    """Write WORKDIR/config/{dataset,loras,router}.yaml for a preset; never overwrite without `force`."""
    from ..errors import UserError

    overrides = preset_overrides(preset)
    config_dir = Path(workdir) / "config"
    existing = [config_dir / n for n in CONFIG_FILES if (config_dir / n).exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} exists; pass --force to overwrite the configs in {config_dir}")
    write_configs(config_dir, overrides)
    return [config_dir / n for n in CONFIG_FILES]
