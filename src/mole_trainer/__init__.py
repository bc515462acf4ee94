"""Mole-Trainer: Mixture-of-LoRA-Experts training infrastructure for vision-language models."""

__version__ = "0.1.0"
