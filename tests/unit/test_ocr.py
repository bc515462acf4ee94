"""OCR crops: the text-line detector on synthetic screens, crops from known boxes, image folders, errors."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from mole_trainer.data.formats import load_expert_dataset
from mole_trainer.data.ocr import OCR_PROMPT, known_text_lines, make_ocr_crops, pad_box, split_images
from mole_trainer.data.ocr_detector import box_iou, detect_text_lines, match_boxes
from mole_trainer.data.ocr_engines import load_image, rapidocr_installed, read_text_lines
from mole_trainer.data.synth import synthesize
from mole_trainer.errors import UserError
from mole_trainer.layout import OCR_SUMMARY_FILE, OCR_UNLABELED_FILE, SPLITS


@pytest.fixture(scope="module")
def ocr_screens(tmp_path_factory):
    """[(image, true line boxes)] of 24 seeded synthetic OCR screens at the default size."""
    root = tmp_path_factory.mktemp("ocr-screens")
    synthesize(root, ["ocr"], {"test": 24}, seed=11)
    out = []
    for s in load_expert_dataset(root / "ocr")["test"]:
        with Image.open(s.images[0]) as im:
            out.append((im.convert("RGB"), [tuple(b) for b in s.metadata["boxes"]]))
    return out


def _scores(screens, transform=lambda im: im):
    detections = [detect_text_lines(transform(im)) for im, _ in screens]
    hits = sum(match_boxes(d, t) for d, (_, t) in zip(detections, screens, strict=True))
    return hits / sum(len(t) for _, t in screens), hits / max(1, sum(map(len, detections)))


def test_detector_finds_the_lines_of_synthetic_ocr_screens(ocr_screens):
    recall, precision = _scores(ocr_screens)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_detector_reads_light_text_on_dark_as_well(ocr_screens):
    recall, precision = _scores(ocr_screens, ImageOps.invert)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_detector_finds_nothing_on_flat_shapes():
    img = Image.new("RGB", (320, 240), (200, 220, 240))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 300, 60), outline=(0, 0, 0))  # a frame
    draw.line((10, 100, 310, 100), fill=(0, 0, 0))  # a rule
    for i in range(5):  # a row of icons
        draw.rounded_rectangle((10 + 24 * i, 200, 26 + 24 * i, 216), radius=3, fill=(30, 120, 200))
    assert detect_text_lines(img) == []
    assert detect_text_lines(np.zeros((50, 50), np.uint8)) == []


def test_iou_padding_and_greedy_matching():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert pad_box((2, 3, 10, 20), 4, 12, 22) == (0, 0, 12, 22)
    assert pad_box((5, 5, 10, 10), 2, 100, 100) == (3, 3, 12, 12)
    truth = [(0, 0, 100, 10), (0, 20, 100, 30)]
    # two detections on the first line: only one may count; nothing matches the second line
    assert match_boxes([(0, 0, 100, 10), (0, 0, 90, 10)], truth) == 1
    assert match_boxes([(0, 0, 100, 10), (0, 21, 100, 31)], truth) == 2
    assert match_boxes([(0, 0, 40, 10)], truth) == 0  # IoU 0.4


def test_known_text_lines_only_from_lines_with_boxes():
    assert known_text_lines({"lines": ["a b"], "boxes": [[1, 2, 30, 12]]}, "f:1") == [((1, 2, 30, 12), "a b")]
    assert known_text_lines({"boxes": [[1, 2, 3, 4]]}, "f:1") is None  # chart marks: no text
    assert known_text_lines({"boxes": {"login": [1, 2, 3, 4]}}, "f:1") is None  # widgets
    with pytest.raises(UserError, match=r"f:3: metadata has 2 'lines' but 1 'boxes'"):
        known_text_lines({"lines": ["a", "b"], "boxes": [[1, 2, 3, 4]]}, "f:3")
    with pytest.raises(UserError, match=r"f:3: metadata.boxes\[0\] must be \[x0, y0, x1, y1\]"):
        known_text_lines({"lines": ["a"], "boxes": [[5, 2, 3, 4]]}, "f:3")


def test_crops_from_known_boxes_keep_splits_text_and_pixels(synth_data, tmp_path):
    src = synth_data / "ocr"
    source = load_expert_dataset(src)
    out = tmp_path / "crops"
    summary = make_ocr_crops(src, out, padding=3, boxes_out=tmp_path / "boxes.jsonl")

    crops = load_expert_dataset(out)
    for split in SPLITS:
        expected = [t for s in source[split] for t in s.metadata["lines"]]
        assert [c.answer for c in crops[split]] == expected
        assert summary["crops"][split] == len(expected)
    assert summary["crops"]["unlabeled"] == 0
    assert summary["images"] == summary["images_known_boxes"] == sum(len(v) for v in source.values())

    by_id = {s.id: s for split in source.values() for s in split}
    split_of_source: dict[str, str] = {}
    for split, samples in crops.items():
        for c in samples:
            m = c.metadata
            assert c.instruction == OCR_PROMPT and m["task"] == "ocr" and m["box_origin"] == "known"
            origin = by_id[m["source_id"]]
            assert split_of_source.setdefault(m["source_image"], split) == split  # no source in two splits
            assert (src / m["source_image"]).resolve() == origin.images[0]
            assert m["source_sha256"] == hashlib.sha256(origin.images[0].read_bytes()).hexdigest()
            assert m["text_box"] in origin.metadata["boxes"]
            with Image.open(origin.images[0]) as im, Image.open(c.images[0]) as crop:
                assert list(m["crop_box"]) == list(pad_box(tuple(m["text_box"]), 3, *im.size))
                assert np.array_equal(
                    np.asarray(crop.convert("RGB")), np.asarray(im.convert("RGB").crop(m["crop_box"]))
                )

    rows = [json.loads(line) for line in (tmp_path / "boxes.jsonl").read_text().splitlines()]
    assert len(rows) == sum(summary["crops"].values())
    assert {r["origin"] for r in rows} == {"known"} and all(r["text"] for r in rows)
    assert json.loads((out / OCR_SUMMARY_FILE).read_text()) == summary


def test_records_without_text_boxes_become_unlabeled_requests(synth_data, tmp_path):
    from mole_trainer.infer.stacked import requests_from_jsonl

    src = synth_data / "calendar"
    source = load_expert_dataset(src)
    summary = make_ocr_crops(src, tmp_path / "crops", engine="opencv")
    assert summary["images_detected"] == sum(len(v) for v in source.values())
    assert all(summary["crops"][s] == 0 for s in SPLITS) and summary["crops"]["unlabeled"] > 0
    lines = [json.loads(x) for x in (tmp_path / "crops" / OCR_UNLABELED_FILE).read_text().splitlines()]
    split_of = {s.id: split for split, samples in source.items() for s in samples}
    assert all(r["split"] == split_of[r["metadata"]["source_id"]] for r in lines)
    requests = requests_from_jsonl(tmp_path / "crops" / OCR_UNLABELED_FILE)  # `mole infer --input` reads it
    assert len(requests) == len(lines) and {r.instruction for r in requests} == {OCR_PROMPT}


def test_image_folder_counts_a_broken_image_as_skipped(synth_data, tmp_path):
    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((synth_data / "login-window" / "images").glob("*.png"))[:2]):
        (folder / ("sub" if i else ".") / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    summary = make_ocr_crops(folder, tmp_path / "crops", engine="opencv")
    assert summary["images"] == 3 and summary["images_detected"] == 2 and summary["images_skipped"] == 1
    assert (
        summary["skipped"][0]["image"] == "broken.png"
        and "cannot be decoded" in summary["skipped"][0]["reason"]
    )
    assert not (tmp_path / "crops" / "train.jsonl").exists()  # no known text: no training records
    sources = {
        json.loads(x)["metadata"]["source_image"] for x in (tmp_path / "crops" / OCR_UNLABELED_FILE).open()
    }
    assert sources <= {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")} and len(sources) == 2


def test_bad_inputs_and_outputs_are_user_errors(synth_data, tmp_path):
    with pytest.raises(UserError, match="input not found"):
        make_ocr_crops(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        make_ocr_crops(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="must not be the input folder"):
        make_ocr_crops(synth_data / "ocr", synth_data / "ocr" / "crops")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty and is not an earlier ocr-crops output"):
        make_ocr_crops(synth_data / "ocr", tmp_path / "busy")
    with pytest.raises(UserError, match="padding"):
        make_ocr_crops(synth_data / "ocr", tmp_path / "out", padding=-1)


def test_rerun_replaces_an_earlier_output(synth_data, tmp_path):
    first = make_ocr_crops(synth_data / "ocr", tmp_path / "crops", padding=8)
    second = make_ocr_crops(synth_data / "ocr", tmp_path / "crops", padding=0)
    assert first["crops"] == second["crops"]
    assert len(list((tmp_path / "crops" / "images").iterdir())) == sum(second["crops"].values())


def test_cli_writes_crops_and_records_the_run(synth_data, tmp_path, capsys):
    from mole_trainer.cli import main
    from mole_trainer.history import History
    from mole_trainer.layout import HISTORY_DB

    args = ["--workdir", str(tmp_path), "data", "ocr-crops", "--input", str(synth_data / "ocr")]
    assert main([*args, "--output", str(tmp_path / "crops"), "--padding", "2"]) == 0
    out = capsys.readouterr().out
    assert "labeled crops (training records): train" in out and "unlabeled crops: 0" in out
    runs = History(tmp_path / HISTORY_DB).runs("data.ocr_crops", None, None)
    assert runs and runs[0]["status"] == "ok"
    assert runs[0]["config"]["engine"] in ("rapidocr", "opencv")
    folder = tmp_path / "shots"
    folder.mkdir()
    _screenshot()[0].save(folder / "s.png")
    opts = ["--engine", "opencv", "--min-confidence", "0.5", "--join-gap", "0"]
    assert main([*args[:4], "--input", str(folder), "--output", str(tmp_path / "cv"), *opts]) == 0
    summary = json.loads((tmp_path / "cv" / OCR_SUMMARY_FILE).read_text())
    assert (summary["engine"], summary["min_confidence"], summary["join_gap"]) == ("opencv", 0.5, 0.0)
    assert summary["crops"]["unlabeled"] == 3 and "through the opencv engine" in capsys.readouterr().out
    missing = ["--workdir", str(tmp_path), "data", "ocr-crops", "--input", str(tmp_path / "nope")]
    assert main([*missing, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "input not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_crops_preprocess_for_the_tiny_model(synth_data, tiny_model, tmp_path):
    from mole_trainer.stages import data_preprocess

    summary = make_ocr_crops(synth_data / "ocr", tmp_path / "crops")
    meta = data_preprocess(
        tmp_path / "crops", tmp_path / "prep", str(tiny_model), "sft", None, 4096, 20000, tmp_path
    )
    assert meta["counts"] == {s: summary["crops"][s] for s in SPLITS}


# ---------------------------------------------------------------------------------------------------------
# engines: rapidocr reads the text of real-shaped screenshots; images of any shape load as a viewer shows


rapidocr = pytest.mark.skipif(not rapidocr_installed(), reason="rapidocr-onnxruntime not installed")

SHOT_LINES = ("Invoice number 4821", "Deliver to Harbor Street", "Total due 73.40")


def _screenshot(scale: int = 1, ink=(20, 20, 20), background=(250, 250, 250)):
    """A plain screen with SHOT_LINES drawn (font 18 px x scale); the image and the line boxes."""
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (480 * scale, 170 * scale), background)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=18 * scale)
    boxes = []
    for i, line in enumerate(SHOT_LINES):
        xy = (20 * scale, (20 + 50 * i) * scale)
        draw.text(xy, line, font=font, fill=ink)
        boxes.append(tuple(draw.textbbox(xy, line, font=font)))
    return img, boxes


def _read(image, engine="rapidocr"):
    return read_text_lines(image, engine)


@pytest.mark.slow  # seconds: left out of make test-fast
@rapidocr
def test_rapidocr_crops_become_records_with_their_text(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    img, boxes = _screenshot()
    img.save(folder / "screen.png")
    out = tmp_path / "crops"
    summary = make_ocr_crops(folder, out, padding=2, engine="rapidocr", boxes_out=tmp_path / "b.jsonl")
    records = load_expert_dataset(out)
    assert summary["engine"] == "rapidocr" and summary["crops"]["unlabeled"] == 0
    assert sorted(r.answer for split in records.values() for r in split) == sorted(SHOT_LINES)
    assert [len(records[s]) for s in SPLITS] == [3, 0, 0]  # one image: its crops all in one split
    with Image.open(folder / "screen.png") as src:
        for r in records["train"]:
            m = r.metadata
            assert r.instruction == OCR_PROMPT and m["engine"] == "rapidocr" and m["box_origin"] == "detected"
            assert m["confidence"] >= summary["min_confidence"]
            truth = boxes[SHOT_LINES.index(r.answer)]
            assert box_iou(tuple(m["text_box"]), truth) >= 0.5
            with Image.open(r.images[0]) as crop:
                assert np.array_equal(np.asarray(crop), np.asarray(src.convert("RGB").crop(m["crop_box"])))
    # the same lines below a confidence nobody reaches are unlabeled requests that keep what was read
    strict = make_ocr_crops(folder, tmp_path / "strict", engine="rapidocr", min_confidence=1.0)
    assert strict["crops"] == {"train": 0, "val": 0, "test": 0, "unlabeled": 3}
    assert strict["lines_below_confidence"] == 3
    rows = [json.loads(x) for x in (tmp_path / "strict" / OCR_UNLABELED_FILE).open()]
    assert sorted(r["metadata"]["recognised_text"] for r in rows) == sorted(SHOT_LINES)


def test_image_folders_split_by_content_and_copies_stay_together():
    shas = {f"{i}.png": f"{i:064x}" for i in range(20)} | {"copy.png": f"{3:064x}"}
    split = split_images(shas)
    assert [sum(v == s for k, v in split.items() if k != "copy.png") for s in SPLITS] == [16, 2, 2]
    assert split["copy.png"] == split["3.png"]
    assert split_images({"a.png": "f" * 64}) == {"a.png": "train"}


@pytest.mark.slow  # seconds: left out of make test-fast
@rapidocr
def test_rapidocr_joins_a_receipt_row_and_restores_spaces():
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (360, 60), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=16)
    draw.text((10, 20), "Fresh bagel", font=font, fill=(0, 0, 0))
    draw.text((180, 20), "3.50", font=font, fill=(0, 0, 0))  # about 7 ink heights right
    assert [ln.text for ln in _read(img)] == ["Fresh bagel 3.50"]
    assert len(read_text_lines(img, "rapidocr", join_gap=0)) == 2


def test_load_image_flattens_transparency_onto_a_contrasting_background(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    rgba.paste((10, 10, 10, 255), (5, 5, 15, 15))  # dark ink on a transparent sheet
    rgba.save(tmp_path / "dark.png")
    flat = np.asarray(load_image(tmp_path / "dark.png"))
    assert flat.shape == (20, 40, 3) and (flat[0, 0] == 255).all() and (flat[10, 10] == 10).all()
    light = Image.new("LA", (40, 20), (0, 0))
    light.paste((240, 255), (5, 5, 15, 15))  # light ink: a white background would hide it
    light.save(tmp_path / "light.png")
    flat = np.asarray(load_image(tmp_path / "light.png"))
    assert (flat[0, 0] == 0).all() and (flat[10, 10] == 240).all()


def test_load_image_palette_and_16_bit(tmp_path):
    img, _ = _screenshot()
    img.quantize(8).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P"
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "palette.png")), expected)
    pal = img.convert("P", palette=Image.ADAPTIVE, colors=4)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette-alpha.png", transparency=0)
    assert load_image(tmp_path / "palette-alpha.png").mode == "RGB"
    # 16-bit grey: 65535 white and 5140 (20 * 257) ink; a plain convert("RGB") clips it all to white
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    flat = np.asarray(load_image(tmp_path / "deep.png"))
    assert np.array_equal(flat[..., 0], np.asarray(img.convert("L")))


@pytest.mark.slow  # seconds: left out of make test-fast
@rapidocr
def test_rapidocr_reads_rgba_palette_and_16_bit_screens(tmp_path):
    img, _ = _screenshot()
    rgba = img.convert("RGBA")
    alpha = (np.asarray(img.convert("L")) < 128).astype(np.uint8) * 255  # ink opaque, paper transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    img.quantize(16).save(tmp_path / "palette.png")
    Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "deep.png")
    for name in ("rgba.png", "palette.png", "deep.png"):
        assert [ln.text for ln in _read(load_image(tmp_path / name))] == list(SHOT_LINES), name


@pytest.mark.slow  # seconds: left out of make test-fast
@rapidocr
def test_exif_orientation_is_applied_before_reading(tmp_path):
    img, boxes = _screenshot()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise to show it upright
    img.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.size == img.size
    lines = _read(shown)
    assert [ln.text for ln in lines] == list(SHOT_LINES)
    assert all(box_iou(ln.box, b) >= 0.5 for ln, b in zip(lines, boxes, strict=True))


@pytest.mark.parametrize("engine", ["opencv", pytest.param("rapidocr", marks=[rapidocr, pytest.mark.slow])])
def test_large_images_are_detected_downscaled_and_boxes_map_back(engine, monkeypatch):
    import mole_trainer.data.ocr_engines as engines

    img, boxes = _screenshot(scale=4)  # 1920 x 680, text 72 px high
    monkeypatch.setattr(engines, "DETECT_MAX_SIDE", 480)  # detection at a quarter of the pixels
    lines = _read(img, engine)
    assert match_boxes([ln.box for ln in lines], boxes) == len(boxes)
    if engine == "rapidocr":
        assert [ln.text for ln in lines] == list(SHOT_LINES)


@pytest.mark.parametrize("engine", ["opencv", pytest.param("rapidocr", marks=[rapidocr, pytest.mark.slow])])
def test_tiny_images_give_boxes_inside_them(engine):
    from PIL import ImageDraw, ImageFont

    for size in ((1, 1), (3, 2), (12, 40)):
        assert _read(Image.new("RGB", size, (255, 255, 255)), engine) == []
    word = Image.new("RGB", (44, 16), (255, 255, 255))
    ImageDraw.Draw(word).text((3, 1), "OK 7", font=ImageFont.load_default(size=12), fill=(0, 0, 0))
    for ln in _read(word, engine):
        assert 0 <= ln.box[0] < ln.box[2] <= 44 and 0 <= ln.box[1] < ln.box[3] <= 16


def test_unknown_or_missing_engine_is_a_user_error(synth_data, tmp_path, monkeypatch):
    import mole_trainer.data.ocr_engines as engines

    with pytest.raises(UserError, match="engine must be one of rapidocr, opencv"):
        make_ocr_crops(synth_data / "ocr", tmp_path / "out", engine="tesseract")
    with pytest.raises(UserError, match="min_confidence"):
        make_ocr_crops(synth_data / "ocr", tmp_path / "out", min_confidence=1.5)
    monkeypatch.setattr(engines, "rapidocr_installed", lambda: False)
    assert engines.default_engine() == "opencv"
    with pytest.raises(UserError, match="rapidocr is not installed"):
        make_ocr_crops(synth_data / "ocr", tmp_path / "out", engine="rapidocr")


def test_join_row_pieces_joins_two_piece_rows_only():
    from mole_trainer.data.ocr_engines import TextLine, join_row_pieces

    item, price = TextLine((10, 20, 60, 30), "Bagel", 0.99), TextLine((120, 21, 150, 30), "3.50", 0.9)
    assert join_row_pieces([price, item], 10) == [TextLine((10, 20, 150, 30), "Bagel 3.50", 0.9)]
    assert len(join_row_pieces([item, price], 5)) == 2  # 60 px apart: more than 5 heights of 9 px
    toolbar = [
        TextLine((x, 5, x + 30, 15), name, 0.99) for x, name in ((0, "File"), (50, "Edit"), (100, "View"))
    ]
    assert join_row_pieces(toolbar, 10) == toolbar  # a row of three labels stays three lines
    below = TextLine((10, 40, 60, 50), "Tea", 0.98)
    assert len(join_row_pieces([item, below], 10)) == 2  # another row


def test_image_folder_skips_an_unreadable_image(synth_data, tmp_path, monkeypatch):
    import mole_trainer.data.ocr as ocr_module

    folder = tmp_path / "shots"
    folder.mkdir()
    for p in sorted((synth_data / "login-window" / "images").glob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    locked = sorted(folder.iterdir())[0]
    real = ocr_module.sha256_file

    def sha(path):  # root reads any mode-000 file, so the refusal is simulated at the one read
        if os.path.basename(path) == locked.name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ocr_module, "sha256_file", sha)
    summary = make_ocr_crops(folder, tmp_path / "crops", engine="opencv")
    assert summary["images"] == 2 and summary["images_detected"] == 1 and summary["images_skipped"] == 1
    assert (
        summary["skipped"][0]["image"] == locked.name and "cannot be read" in summary["skipped"][0]["reason"]
    )
