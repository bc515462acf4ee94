"""Loading a base Qwen3-VL (local folder or hub id) and its processor, the same way for every size."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def resolve_dtype(dtype: str, device: str):
    """torch dtype for a name; 'auto' is bf16 on CUDA with bf16 support, else fp32."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}' (expected auto, {', '.join(table)})")
    return table[dtype]


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a CUDA device without CUDA is a user error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


def processor_digest(path_or_hub_id: str) -> str:
    """Identity of a base's processor: sha256 of its tokenizer/processor files, or the hub id itself.

    Preprocessed data records it; training checks it, so token ids made by one tokenizer are never
    trained on another base.
    """
    from ..hashing import named_files_digest

    root = Path(path_or_hub_id)
    if not root.is_dir():
        return path_or_hub_id
    keys = ("tokenizer", "processor", "chat_template", "vocab", "merges")
    files = (f for f in sorted(root.iterdir()) if f.is_file() and any(k in f.name for k in keys))
    return named_files_digest((f.name, f) for f in files)


def _check_source(path_or_hub_id: str) -> None:
    p = Path(path_or_hub_id)
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: not a model folder (no config.json)")
        return
    from ..config import looks_like_hub_id

    if not looks_like_hub_id(path_or_hub_id):
        raise UserError(
            f"{path_or_hub_id}: model folder not found (and not a hub id like 'Qwen/Qwen3-VL-8B-Instruct')"
        )


def load_processor(path_or_hub_id: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """AutoProcessor of the base, with the pixel budget applied (the same at training and inference)."""
    from transformers import AutoProcessor

    _check_source(path_or_hub_id)
    try:
        processor = AutoProcessor.from_pretrained(path_or_hub_id)
    except OSError as exc:
        raise UserError(f"{path_or_hub_id}: cannot load the processor ({exc})") from None
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def load_base(path_or_hub_id: str, dtype: str = "auto", device: str = "auto", attn: str = "sdpa"):
    """Load a Qwen3-VL model (tiny local folder or `Qwen/Qwen3-VL-8B-Instruct`) in eval mode."""
    from transformers import AutoModelForImageTextToText

    _check_source(path_or_hub_id)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_hub_id, dtype=torch_dtype, attn_implementation=attn
        )
    except OSError as exc:
        raise UserError(f"{path_or_hub_id}: cannot load the model ({exc})") from None
    return model.to(device).eval()
