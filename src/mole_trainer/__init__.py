"""Mole-Trainer: Mixture-of-LoRA-Experts training infrastructure for vision-language models."""

from .version import __version__ as __version__  # re-exported: the version lives in a leaf module

__all__ = ["MoLE"]


def __getattr__(name: str):
    # `from mole_trainer import MoLE` loads the API on first use: `import mole_trainer` (and `mole --help`) stays light
    if name == "MoLE":
        from .api import MoLE

        return MoLE
    raise AttributeError(f"module 'mole_trainer' has no attribute {name!r}")
