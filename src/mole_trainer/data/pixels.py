"""Compact cache storage of an example: each image as the processor's resized uint8 image in PNG.

Qwen's image processor (transformers' Qwen2VLImageProcessor, torchvision backend, also used by
Qwen3-VL) resizes every image in uint8 (smart_resize, bicubic with antialias), converts it to
float32 with one fused rescale-and-normalise, `(x - mean / r) / (std / r)` with `r` the rescale
factor, cuts it into patches and repeats every patch `temporal_patch_size` times. Everything after
the resize is a fixed function of the resized uint8 image, so the cache keeps that image (losslessly
compressed as PNG) and `unpack_example` repeats the same float32 operations (cutting the patches
first, which moves values without changing them): the result is bit-equal to the processor's `pixel_values`. The cache writer checks this against the
processor once per process and falls back to the exact float storage where it does not hold.

Token tensors are stored in the narrowest integer type that holds them (int32 ids and labels,
uint8 masks) and widened back to the processor's int64.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

# passed to the processor call: the resized uint8 image, patchified, without rescale/normalise
RAW_PIXEL_KWARGS = {"do_rescale": False, "do_normalize": False}
COMPACT, PLAIN = "png", "float32"  # the two storage modes of a cached example's pixels
PNG_KEY = "pixel_png"  # compact: one PNG (uint8 tensor of its bytes) per image
FRAMES_KEY = "pixel_frames"  # plain: the float patches with the temporal copies taken out
NARROW = {"input_ids": "int32", "labels": "int32", "attention_mask": "uint8", "mm_token_type_ids": "uint8"}
PNG_LEVEL = 1  # zlib level: 1 encodes ~40 % faster than the default 6 for ~10 % more bytes (GUI screens)


@dataclass(frozen=True)
class PixelSpec:
    """What turns a resized uint8 image into the processor's pixel_values (read from the processor)."""

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


def unpatchify(patches, grid_hw: tuple[int, int], spec: PixelSpec):
    """(height, width, channels) image of one image's patch rows (inverse of the processor's layout).

    Rows are (merge block row, merge block column, row in block, column in block); each row holds
    (channel, temporal copy, pixel row, pixel column). The temporal copies must be equal (a still image).
    """
    import torch

    gh, gw = grid_hw
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    x = patches.reshape(gh // m, gw // m, m, m, -1, t, p, p)
    if not all(torch.equal(x[..., 0, :, :], x[..., k, :, :]) for k in range(1, t)):
        raise ValueError("the temporal copies of an image's patches differ (not a still image)")
    c = x.shape[4]
    # (block row, block col, row, col, channel, py, px) -> (block row, row, py, block col, col, px, channel)
    return x[..., 0, :, :].permute(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, c).contiguous()


def patchify(image, spec: PixelSpec):
    """Patch rows of a (height, width, channels) image, each repeated temporally (the processor's layout)."""
    h, w, c = image.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    # (block row, row, py, block col, col, px, channel) -> (block row, block col, row, col, channel, py, px)
    x = image.reshape(gh // m, m, p, gw // m, m, p, c).permute(0, 3, 1, 4, 6, 2, 5)
    return x.unsqueeze(5).expand(*x.shape[:5], t, p, p).reshape(gh * gw, c * t * p * p)


def normalize(patches, spec: PixelSpec):
    """The processor's rescale/normalise of uint8 patch rows: fused factors, float32, subtract then divide.

    The processor normalises the image before cutting it into patches; the operations are per
    element with per-channel constants, so doing them on the patch rows gives the same bits.
    """
    import torch

    rows = patches.view(patches.shape[0], len(spec.image_mean), -1)  # (patch, channel, values)
    if spec.do_normalize:
        mean, std = torch.tensor(spec.image_mean), torch.tensor(spec.image_std)
        if spec.do_rescale:
            mean, std = mean * (1.0 / spec.rescale_factor), std * (1.0 / spec.rescale_factor)
        rows = rows.to(torch.float32).sub_(mean.view(1, -1, 1)).div_(std.view(1, -1, 1))
    elif spec.do_rescale:
        rows = rows * spec.rescale_factor
    return rows.reshape(patches.shape)


def png_encode(image):
    """PNG bytes (as a uint8 tensor) of a (height, width, 3) uint8 image."""
    import torch
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, "PNG", compress_level=PNG_LEVEL)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).clone()


def png_decode(data):
    """(height, width, 3) uint8 image of png_encode's bytes."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy())) as im:
        return torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB")))


def _per_image(pixel_values, grid_thw) -> list:
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    return list(pixel_values.split(sizes))


def pack_example(example: dict, spec: PixelSpec, mode: str) -> dict:
    """The stored form of an encoded example.

    COMPACT takes an example encoded with RAW_PIXEL_KWARGS (uint8 patches): one PNG per image,
    narrow token types. PLAIN takes the processor's own example and only drops the temporal copies.
    """
    import torch

    out = {k: v for k, v in example.items() if k != "pixel_values"}
    pv = example.get("pixel_values")
    if mode == PLAIN:
        if pv is not None:
            frames = pv.view(pv.shape[0], 3, spec.temporal_patch_size, -1)
            out[FRAMES_KEY] = frames[:, :, 0].contiguous()
        return out
    for key, dtype in NARROW.items():
        if key in out:
            narrow = out[key].to(getattr(torch, dtype))
            if not torch.equal(narrow.to(out[key].dtype), out[key]):
                raise ValueError(f"{key} does not fit {dtype}")
            out[key] = narrow
    out[PNG_KEY] = []
    if pv is not None:
        if pv.dtype != torch.uint8:
            raise ValueError(f"the processor's unnormalised pixels are {pv.dtype}, not uint8")
        grids = example["image_grid_thw"]
        if (grids[:, 0] != 1).any():
            raise ValueError("an image spans several temporal patches")
        blocks = zip(_per_image(pv, grids), grids.tolist(), strict=True)
        images = [unpatchify(x, (h, w), spec) for x, (_, h, w) in blocks]
        out[PNG_KEY] = [png_encode(im) for im in images]
    return out


def unpack_example(stored: dict, spec: PixelSpec) -> dict[str, Any]:
    """The example the processor gave (input_ids, ..., pixel_values) from its stored form."""
    import torch

    out = dict(stored)
    if PNG_KEY in out:  # compact, with or without images
        parts = [normalize(patchify(png_decode(b), spec), spec) for b in out.pop(PNG_KEY)]
        if parts:
            out["pixel_values"] = parts[0] if len(parts) == 1 else torch.cat(parts)
        for key in NARROW:
            if key in out:
                out[key] = out[key].to(torch.int64)
    elif FRAMES_KEY in out:
        f = out.pop(FRAMES_KEY)
        t = spec.temporal_patch_size
        out["pixel_values"] = f.unsqueeze(2).expand(-1, -1, t, -1).reshape(f.shape[0], -1)
    return out


def same_example(a: dict, b: dict) -> bool:
    """True when two examples have the same keys and bit-equal tensors of the same dtypes."""
    import torch

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
