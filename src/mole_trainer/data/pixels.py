"""Compact cache storage of an example: the processor's resized uint8 pixels, compressed losslessly.

Qwen's image processor (transformers' Qwen2VLImageProcessor, torchvision backend, also used by
Qwen3-VL) resizes every image in uint8 (smart_resize, bicubic with antialias), converts it to
float32 with one fused rescale-and-normalise, `(x - mean / r) / (std / r)` with `r` the rescale
factor, cuts it into patch rows (channel, temporal copy, pixel row, pixel column) and repeats each
patch `temporal_patch_size` times. Everything after the resize is a fixed function of the resized
uint8 image. The cache asks the processor for exactly that (RAW_PIXEL_KWARGS: no rescale, no
normalise, so its patch rows hold the uint8 image), keeps one temporal copy and compresses it with
zlib; `unpack_example` repeats the copies and applies the same float32 operations per element
with the same per-channel constants, so the result is bit-equal to the processor's `pixel_values`.
The cache writer checks this against the processor once per process and falls back to the exact
float storage where it does not hold.

Token tensors are stored in the narrowest integer type that holds them (int32 ids and labels,
uint8 masks) and widened back to the processor's int64.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

# passed to the processor call: the resized uint8 image in patch rows, without rescale/normalise
RAW_PIXEL_KWARGS = {"do_rescale": False, "do_normalize": False}
COMPACT, PLAIN = "uint8-zlib", "float32"  # the two storage modes of a cached example's pixels
ZLIB_KEY = "pixel_zlib"  # compact: the uint8 patch rows of every image, one temporal copy, zlib'd
FRAMES_KEY = "pixel_frames"  # plain: the float patches with the temporal copies taken out
NARROW = {"input_ids": "int32", "labels": "int32", "attention_mask": "uint8", "mm_token_type_ids": "uint8"}
# zlib level: on the demo's GUI screens level 6 is 14 % smaller than level 1, for an encode time still
# well below the processor's, and decoding costs the same
ZLIB_LEVEL = 6


@dataclass(frozen=True)
class PixelSpec:
    """What turns the resized uint8 patch rows into the processor's pixel_values (read from it)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def of(cls, image_processor) -> PixelSpec:
        """The spec of a loaded image processor."""
        ip = image_processor
        return cls(
            int(ip.patch_size),
            int(ip.merge_size),
            int(ip.temporal_patch_size),
            bool(ip.do_rescale),
            float(ip.rescale_factor),
            bool(ip.do_normalize),
            tuple(float(v) for v in ip.image_mean),
            tuple(float(v) for v in ip.image_std),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PixelSpec:
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        fields["image_mean"], fields["image_std"] = tuple(d["image_mean"]), tuple(d["image_std"])
        return cls(**fields)

    @property
    def channels(self) -> int:
        return len(self.image_mean)


def one_frame(patches, spec: PixelSpec):
    """(rows, channels, values) of uint8 patch rows with the temporal copies taken out (checked equal)."""
    import torch

    x = patches.view(patches.shape[0], spec.channels, spec.temporal_patch_size, -1)
    if not all(torch.equal(x[:, :, 0], x[:, :, k]) for k in range(1, spec.temporal_patch_size)):
        raise ValueError("the temporal copies of the patches differ (not still images)")
    return x[:, :, 0].contiguous()


def all_frames(frames, spec: PixelSpec):
    """Patch rows of one_frame's output: each frame repeated temporal_patch_size times."""
    t = spec.temporal_patch_size
    return frames.unsqueeze(2).expand(-1, -1, t, -1).reshape(frames.shape[0], -1)


def normalize(frames, spec: PixelSpec):
    """The processor's rescale/normalise of (rows, channels, values) uint8 frames: fused factors,
    float32, subtract then divide; the temporal copies are repeated first (rows of pixel_values).

    The processor normalises the image before cutting it into patches; the operations are per
    element with per-channel constants, so doing them on the patch rows gives the same bits.
    """
    import torch

    t = spec.temporal_patch_size
    x = frames.unsqueeze(2).expand(-1, -1, t, -1)  # (row, channel, temporal copy, values)
    if spec.do_normalize:
        mean, std = torch.tensor(spec.image_mean), torch.tensor(spec.image_std)
        if spec.do_rescale:
            mean, std = mean * (1.0 / spec.rescale_factor), std * (1.0 / spec.rescale_factor)
        x = x.to(torch.float32).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    elif spec.do_rescale:
        x = x * spec.rescale_factor
    return x.reshape(frames.shape[0], -1)


def compress(frames):
    """zlib bytes (a uint8 tensor) of a uint8 tensor."""
    import torch

    return torch.frombuffer(bytearray(zlib.compress(frames.numpy().tobytes(), ZLIB_LEVEL)), dtype=torch.uint8)


def decompress(data, rows: int, spec: PixelSpec):
    """(rows, channels, values) uint8 frames of compress's bytes."""
    import torch

    raw = bytearray(zlib.decompress(data.numpy()))
    return torch.frombuffer(raw, dtype=torch.uint8).view(rows, spec.channels, -1)


def pack_example(example: dict, spec: PixelSpec, mode: str) -> dict:
    """The stored form of an encoded example.

    COMPACT takes an example encoded with RAW_PIXEL_KWARGS (uint8 patch rows): one temporal copy,
    zlib'd, and narrow token types. PLAIN takes the processor's own example and only drops the
    temporal copies.
    """
    import torch

    out = {k: v for k, v in example.items() if k != "pixel_values"}
    pv = example.get("pixel_values")
    if mode == PLAIN:
        if pv is not None:
            frames = pv.view(pv.shape[0], spec.channels, spec.temporal_patch_size, -1)
            out[FRAMES_KEY] = frames[:, :, 0].contiguous()
        return out
    for key, dtype in NARROW.items():
        if key in out:
            narrow = out[key].to(getattr(torch, dtype))
            if not torch.equal(narrow.to(out[key].dtype), out[key]):
                raise ValueError(f"{key} does not fit {dtype}")
            out[key] = narrow
    out[ZLIB_KEY] = torch.zeros(0, dtype=torch.uint8)
    if pv is not None:
        if pv.dtype != torch.uint8:
            raise ValueError(f"the processor's unnormalised pixels are {pv.dtype}, not uint8")
        out[ZLIB_KEY] = compress(one_frame(pv, spec))
    return out


def unpack_example(stored: dict, spec: PixelSpec) -> dict[str, Any]:
    """The example the processor gave (input_ids, ..., pixel_values) from its stored form."""
    import torch

    out = dict(stored)
    if ZLIB_KEY in out:  # compact, with or without images
        data = out.pop(ZLIB_KEY)
        if "image_grid_thw" in out:
            rows = int(out["image_grid_thw"].prod(-1).sum())
            out["pixel_values"] = normalize(decompress(data, rows, spec), spec)
        for key in NARROW:
            if key in out:
                out[key] = out[key].to(torch.int64)
    elif FRAMES_KEY in out:
        out["pixel_values"] = all_frames(out.pop(FRAMES_KEY), spec)
    return out


def same_example(a: dict, b: dict) -> bool:
    """True when two examples have the same keys and bit-equal tensors of the same dtypes."""
    import torch

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
