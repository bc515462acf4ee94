"""Mole-Trainer: Mixture-of-LoRA-Experts training infrastructure for vision-language models."""

__version__ = "0.1.0"

__all__ = ["MoLE"]


def __getattr__(name: str):
    # `from mole_trainer import MoLE` loads the API on first use: `import mole_trainer` (and `mole --help`) stays light
    if name == "MoLE":
        from .api import MoLE

        return MoLE
    raise AttributeError(f"module 'mole_trainer' has no attribute {name!r}")
