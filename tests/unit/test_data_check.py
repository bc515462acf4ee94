"""`mole data check`: passes on what the builder writes, fails (listing where) on leaks and broken records."""

import json
import shutil
import subprocess
import sys

import pytest

from mole_trainer.config import DatasetConfig, ExpertSource
from mole_trainer.data.check import DataCheckFailed, check_routing_dataset
from mole_trainer.data.routing import build_routing_dataset
from mole_trainer.errors import UserError
from mole_trainer.stages import data_check

NAMES = ["calendar", "chart-screen", "login-window", "ocr"]


def build(synth_data, folder, **kw):
    cfg = DatasetConfig(
        experts={n: ExpertSource(str(synth_data / n)) for n in NAMES},
        **{"train_per_expert": 8, "val_per_expert": 2, "test_per_expert": 3, **kw},
    )
    out = folder / "routing_data.jsonl"
    return out, build_routing_dataset(cfg, out)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def leak(out, new_name=None):
    """Copy the first train record into test under a new id (and, if asked, its image under a new name)."""
    records = lines(out)
    copy = dict(next(r for r in records if r["split"] == "train"))
    copy.update(id=copy["id"] + "-leaked", split="test")
    if new_name:
        shutil.copyfile(out.parent / copy["images"][0], out.parent / "images" / new_name)
        copy["images"] = [f"images/{new_name}"]
    write(out, [*records, copy])
    return len(records) + 1  # the leaked record's line


@pytest.fixture
def built(synth_data, tmp_path):
    return build(synth_data, tmp_path / "routing")


def test_builder_output_passes_and_matches_its_stats(built):
    out, stats = built
    report = check_routing_dataset(out.parent)
    assert report["violations"] == [] and report["warnings"] == []
    assert report["counts"] == stats["counts"]
    assert report["records"] == stats["records"] == report["images"]


@pytest.mark.parametrize("new_name", [None, "renamed-copy.png"])
def test_leaking_split_fails_naming_image_splits_and_lines(built, new_name):
    out, _ = built
    first_train = next(i for i, r in enumerate(lines(out), start=1) if r["split"] == "train")
    leaked_line = leak(out, new_name)
    with pytest.raises(DataCheckFailed) as exc:
        data_check(out.parent, out.parent)
    (violation,) = exc.value.report["violations"]
    assert "is in splits train, test" in violation
    assert f"train: {out}:{first_train}" in violation and f"test: {out}:{leaked_line}" in violation
    assert "1 violation(s)" in str(exc.value)
    # the builder's stats no longer describe the data: a warning, not a second violation
    assert any("test records, routing_data.stats.json says 3" in w for w in exc.value.report["warnings"])
    assert isinstance(exc.value, UserError)


def test_same_image_under_two_experts_and_two_names(synth_data, tmp_path):
    """The ocr images again under other file names, as the dataset of another expert."""
    twin = tmp_path / "twin"
    shutil.copytree(synth_data / "ocr", twin)
    for f in (twin / "images").iterdir():
        f.rename(f.with_name("copy-" + f.name))
    for split in ("train", "val", "test"):
        records = lines(twin / f"{split}.jsonl")
        for r in records:
            r["images"] = [p.replace("images/", "images/copy-") for p in r["images"]]
            r["messages"][0]["content"][-1]["text"] = "Please: " + r["messages"][0]["content"][-1]["text"]
        write(twin / f"{split}.jsonl", records)
    cfg = DatasetConfig(
        experts={"ocr": ExpertSource(str(synth_data / "ocr")), "twin": ExpertSource(str(twin))},
        train_per_expert=10,
        val_per_expert=3,
        test_per_expert=4,
    )
    out = tmp_path / "routing" / "r.jsonl"
    build_routing_dataset(cfg, out)
    report = check_routing_dataset(out)
    assert report["violations"] == []
    # the shared images are one file each, used by both experts
    assert report["distinct_images"] == report["images"] < report["records"]
    leak(out, "another-name.png")
    assert any("is in splits train, test" in v for v in check_routing_dataset(out)["violations"])


def test_every_violation_is_listed(built):
    out, _ = built
    records = lines(out)
    records[0]["expert"] = "ghost"
    del records[1]["split"]
    records[2]["images"] = ["images/missing.png"]
    bad_image = out.parent / records[3]["images"][0]
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write(out, records)
    with out.open("a") as fh:
        fh.write("{not json\n")
    with out.open("ab") as fh:
        fh.write(b'{"id": "\xff"}\n')
    (out.parent / "label_map.json").write_text(json.dumps(dict.fromkeys(NAMES, 0)))
    v = check_routing_dataset(out.parent)["violations"]
    text = "\n".join(v)
    assert len(v) == 6, text
    assert f"{out}:{len(records) + 2}: not valid UTF-8" in text
    assert "label map must map each expert name to a distinct index 0..K-1" in text
    assert "ghost" not in text  # no valid label map to compare the experts with
    assert f"{out}:2: field 'split' is missing" in text
    assert f"{out}:3" in text and "missing.png" in text
    assert f"{out}:4" in text and "cannot be decoded" in text
    assert f"{out}:{len(records) + 1}: not valid JSON" in text
    (out.parent / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(NAMES)}))
    v = check_routing_dataset(out.parent)["violations"]
    assert any(f"{out}:1: expert 'ghost' is not in the label map" in m for m in v)


def test_cli_routing_table_then_check_exit_codes(synth_data, tmp_path):
    cfg = tmp_path / "dataset.yaml"
    experts = ", ".join(f"{n}: {{path: {synth_data / n}}}" for n in NAMES)
    cfg.write_text(
        f"experts: {{{experts}}}\ntrain_per_expert: 20\noversample: true\nval_per_expert: 2\ntest_per_expert: 3\nseed: 5\n"
    )
    out = tmp_path / "routing" / "routing_data.jsonl"
    mole = [sys.executable, "-m", "mole_trainer.cli", "--workdir", str(tmp_path), "data"]
    built = subprocess.run(
        [*mole, "routing", "--config", str(cfg), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    assert "repeats" in built.stdout and "imbalance ratio (max/min train) 1.0" in built.stdout
    assert "oversample on, seed 5" in built.stdout
    cmd = [*mole, "check"]
    ok = subprocess.run([*cmd, str(out.parent)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ok: records parse" in ok.stdout and "calendar" in ok.stdout
    leak(out)
    bad = subprocess.run([*cmd, str(out.parent)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "is in splits train, test" in bad.stderr
    missing = subprocess.run([*cmd, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stderr
