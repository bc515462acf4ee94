"""The pixel budget of a config bounds what the model sees: the visual tokens of every image, whatever its
size, stay within max_pixels (and above min_pixels), with the genuine Qwen3-VL-8B processor."""

from pathlib import Path

import pytest

from mole_trainer.data.preprocess import encode_sample
from mole_trainer.data.records import Sample
from mole_trainer.model.loading import load_processor

PROCESSOR = Path(__file__).parents[1] / "fixtures" / "qwen3-vl-8b-processor"
BUDGET = {"min_pixels": 4096, "max_pixels": 20000}
# wide, tall, square, larger than the budget by far, smaller than the minimum
SIZES = [(1920, 1080), (300, 2000), (640, 640), (4000, 3000), (40, 30), (141, 141)]


@pytest.fixture(scope="module")
def processor():
    return load_processor(str(PROCESSOR), **BUDGET)


@pytest.mark.parametrize("size", SIZES)
def test_max_pixels_bounds_the_visual_tokens(processor, tmp_path, size):
    from PIL import Image

    ip = processor.image_processor
    patch, merge = ip.patch_size, ip.merge_size
    path = tmp_path / "x.png"
    Image.new("RGB", size, (90, 160, 40)).save(path)
    sample = Sample(id="r1", images=[path], instruction="Read it.", answer="ok", source="t.jsonl:1")
    enc = encode_sample(processor, sample, "sft")
    t, h, w = enc["image_grid_thw"].reshape(-1).tolist()
    tokens = t * h * w // merge**2
    # one visual token stands for a (patch*merge)^2 square of the resized image
    assert tokens <= BUDGET["max_pixels"] // (patch * merge) ** 2
    assert tokens >= BUDGET["min_pixels"] // (patch * merge) ** 2
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_pad).sum()) == tokens  # the prompt holds exactly that many
