"""Small settings for end-to-end tests: the demo's configs with tiny sizes merged in."""

import base64
import io
import re

from mole_trainer.configs import write_configs

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]
SMALL_TRAIN = {"lr": 0.003, "steps": 4, "batch_size": 4, "eval_every": 2, "warmup_ratio": 0.0, "patience": 0}
SMALL_LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
SMALL_IMAGE = {"min_pixels": 4096, "max_pixels": 20000}
SMALL = {
    "dataset.yaml": {"train_per_expert": 8, "val_per_expert": 2, "test_per_expert": 3},
    "loras.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN, "eval_records": 2},
    "router.yaml": {"image": SMALL_IMAGE, "lora": SMALL_LORA, "train": SMALL_TRAIN},
}


def write_small_configs(config_dir) -> None:
    """The demo's three configs with test sizes, in `config_dir` (WORKDIR/config layout)."""
    write_configs(config_dir, SMALL, every_expert={"loras.yaml": {"max_new_tokens": 4}})


def report_images(page: str, names) -> dict[str, bytes]:
    """The embedded PNG of each named figure section of a history report page (b"" when it has none)."""
    out = {}
    for name in names:
        section = re.search(rf'<section id="{name}">(.*?)</section>', page, re.S)
        assert section, f"no section {name}"
        img = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section.group(1))
        out[name] = base64.b64decode(img.group(1)) if img else b""
    return out


def png_has_drawing(png: bytes) -> bool:
    """A real PNG with something drawn on it: many distinct colours, not a blank canvas."""
    from PIL import Image

    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.width >= 300 and len(image.getcolors(1 << 20) or []) > 20
