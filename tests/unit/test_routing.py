import json
import shutil

import pytest

from mole_trainer.config import DatasetConfig, ExpertSource
from mole_trainer.data.formats import load_jsonl_samples
from mole_trainer.data.routing import build_routing_dataset, load_label_map
from mole_trainer.errors import UserError


def config(root, names, **kw):
    return DatasetConfig(experts={n: ExpertSource(path=str(root / n)) for n in names}, **kw)


def image_hashes_by_split(path):
    out = {}
    for s in load_jsonl_samples(path):
        for p in s.images:
            out.setdefault(p.name, set()).add(s.split)
    return out


def test_balanced_disjoint_and_labelled(synth_data, tmp_path):
    names = ["calendar", "chart-screen", "login-window", "ocr"]
    out = tmp_path / "r" / "routing.jsonl"
    stats = build_routing_dataset(
        config(synth_data, names, train_per_expert=10, val_per_expert=3, test_per_expert=4), out
    )
    assert load_label_map(out.parent / "label_map.json") == {n: i for i, n in enumerate(sorted(names))}
    for name in names:
        assert stats["counts"][name] == {"train": 10, "val": 3, "test": 4}
    assert stats["imbalance_ratio"] == 1.0
    assert all(len(splits) == 1 for splits in image_hashes_by_split(out).values())
    # nothing is lost: kept + duplicates + unused = input
    for name in names:
        kept = sum(stats["counts"][name].values())
        dropped = stats["duplicates_dropped"][name] + stats["conflicts_dropped"][name]
        assert kept + dropped + stats["unused_for_balance"][name] == stats["input_records"][name]


def make_twin(synth_data, tmp_path, instruction_prefix=""):
    """The "ocr" dataset again as another expert: same image bytes under other file names."""
    twin = tmp_path / "twin"
    shutil.copytree(synth_data / "ocr", twin)
    for f in (twin / "images").iterdir():
        f.rename(f.with_name("copy-" + f.name))
    for split in ("train", "val", "test"):
        lines = []
        for line in (twin / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line.replace("images/", "images/copy-"))
            rec["messages"][0]["content"][-1]["text"] = (
                instruction_prefix + rec["messages"][0]["content"][-1]["text"]
            )
            lines.append(json.dumps(rec))
        (twin / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return DatasetConfig(
        experts={"ocr": ExpertSource(str(synth_data / "ocr")), "twin": ExpertSource(str(twin))},
        train_per_expert=50,
        val_per_expert=3,
        test_per_expert=4,
    )


def test_same_image_under_two_experts_never_straddles_splits(synth_data, tmp_path):
    out = tmp_path / "r.jsonl"
    build_routing_dataset(make_twin(synth_data, tmp_path, "Please: "), out)
    by_image = {}
    for s in load_jsonl_samples(out):
        by_image.setdefault(s.images[0].name, set()).add((s.split, s.expert))
    assert all(len({sp for sp, _ in v}) == 1 for v in by_image.values())
    assert any(len(v) == 2 for v in by_image.values())  # the shared images are kept once per expert


def test_same_request_claimed_by_two_experts_is_dropped_and_counted(synth_data, tmp_path):
    stats = build_routing_dataset(make_twin(synth_data, tmp_path), tmp_path / "r.jsonl")
    n = stats["input_records"]["ocr"]
    assert stats["conflicts_dropped"] == {"ocr": n, "twin": n}
    assert stats["records"] == 0 or all(
        c == {"train": 0, "val": 0, "test": 0} for c in stats["counts"].values()
    )


def test_deterministic_and_independent_of_file_order(synth_data, tmp_path):
    cfg = config(synth_data, ["calendar", "ocr"], train_per_expert=8, val_per_expert=2, test_per_expert=3)
    a, b = tmp_path / "a/r.jsonl", tmp_path / "b/r.jsonl"
    build_routing_dataset(cfg, a)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(synth_data, shuffled)
    for name in ("calendar", "ocr"):
        f = shuffled / name / "train.jsonl"
        f.write_text("".join(reversed(f.read_text().splitlines(keepends=True))))
    build_routing_dataset(
        config(shuffled, ["calendar", "ocr"], train_per_expert=8, val_per_expert=2, test_per_expert=3), b
    )

    def key(path):
        return sorted((r["id"], r["split"]) for r in map(json.loads, path.read_text().splitlines()))

    assert key(a) == key(b)


def test_exact_duplicates_dropped_and_counted(synth_data, tmp_path):
    dup = tmp_path / "dup"
    shutil.copytree(synth_data / "calendar", dup)
    lines = (dup / "train.jsonl").read_text().splitlines()
    extra = json.loads(lines[0])
    extra["id"] = "again"
    (dup / "train.jsonl").write_text("\n".join([*lines, json.dumps(extra)]) + "\n")
    stats = build_routing_dataset(
        DatasetConfig(
            experts={"calendar": ExpertSource(str(dup))},
            train_per_expert=100,
            val_per_expert=2,
            test_per_expert=2,
        ),
        tmp_path / "r.jsonl",
    )
    assert stats["duplicates_dropped"]["calendar"] == 1


def test_config_errors(synth_data, tmp_path):
    with pytest.raises(UserError, match="no expert datasets"):
        build_routing_dataset(DatasetConfig(), tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="dataset folder not found"):
        build_routing_dataset(config(tmp_path, ["ghost"]), tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="expert name 'Bad Name'"):
        build_routing_dataset(
            DatasetConfig(experts={"Bad Name": ExpertSource(str(synth_data / "ocr"))}), tmp_path / "r.jsonl"
        )
