"""The server's settings: one dataclass shared by `mole serve`'s options and the Modal endpoint's config.

A serve config (YAML or JSON, loaded strictly like the other configs) holds these keys; the CLI
options of the same names override nothing here, they fill the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .defaults import (
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_TOKENS,
    MAX_WAIT_MS,
)
from .messages import Limits

# the ServeConfig fields `mole serve` takes as options (--max-batch fills max_batch, ...)
SERVE_OPTIONS = (
    "deployment",
    "device",
    "dtype",
    "base_model",
    "max_batch",
    "max_wait_ms",
    "min_probability",
    "fallback",
    "max_image_pixels",
    "max_images",
    "max_body_bytes",
    "max_tokens",
    "allow_files",
)


@dataclass
class ServeConfig:
    """How the routed stack is served (engine, batching, request limits; GPU and scale-out on Modal)."""

    deployment: str = ""  # a folder or fsspec URL; on Modal relative to the checkpoints Volume
    device: str = "auto"
    dtype: str = "auto"
    base_model: str | None = None
    max_batch: int = MAX_BATCH
    max_wait_ms: float = MAX_WAIT_MS
    min_probability: float | None = None
    fallback: str | None = None  # an expert's name, or "base"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = MAX_IMAGES
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens: int = MAX_TOKENS
    allow_files: str | None = None
    # Modal only: the GPU of each replica, requests one replica takes at once, and the replica range
    gpu: str | None = "L40S"
    concurrency: int = 32
    min_containers: int = 0
    max_containers: int = 4

    def problems(self) -> dict[str, str]:
        """Invalid values, by key."""
        out = {
            k: "must be >= 1"
            for k in (
                "max_batch",
                "max_image_pixels",
                "max_images",
                "max_body_bytes",
                "max_tokens",
                "concurrency",
            )
            if getattr(self, k) < 1
        }
        if self.max_wait_ms < 0:
            out["max_wait_ms"] = "must be >= 0"
        if self.min_probability is not None and not 0 <= self.min_probability <= 1:
            out["min_probability"] = "must be between 0 and 1"
        if (self.min_probability is None) != (self.fallback is None):
            out["fallback"] = "give min_probability and fallback together (a fallback answers below it)"
        if not 0 <= self.min_containers <= self.max_containers:
            out["max_containers"] = "must be >= min_containers >= 0"
        return out

    def limits(self) -> Limits:
        """The request limits of these settings."""
        return Limits(
            max_image_pixels=self.max_image_pixels,
            max_images=self.max_images,
            max_body_bytes=self.max_body_bytes,
            max_tokens=self.max_tokens,
            allow_files=Path(self.allow_files) if self.allow_files else None,
        )


def serve_settings(config: str | Path | None = None, resolve: bool = True, **overrides) -> ServeConfig:
    """Settings from a serve config file (or the defaults), with the given non-None `overrides` on top;
    invalid values are UserErrors naming the key. With `resolve`, the file's local paths (deployment,
    allow_files, base_model) are relative to its folder, like every config's; without, they stay as
    written (the Modal endpoint reads them relative to its Volumes)."""
    import dataclasses

    from ..config import _read_raw, from_dict, resolve_path

    base = from_dict(ServeConfig, _read_raw(Path(config)), str(config)) if config else ServeConfig()
    if config and resolve:
        for key in ("deployment", "allow_files", "base_model"):
            value = getattr(base, key)
            if value and "://" not in value:
                setattr(base, key, resolve_path(value, Path(config).parent, allow_hub_id=key == "base_model"))
    merged = {**dataclasses.asdict(base), **{k: v for k, v in overrides.items() if v is not None}}
    return from_dict(ServeConfig, merged, source=str(config) if config else "serve options")
