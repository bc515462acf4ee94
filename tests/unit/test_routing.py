import builtins
import collections
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from mole_trainer.config import DatasetConfig, ExpertSource, load_config
from mole_trainer.data.check import check_routing_dataset
from mole_trainer.data.records import load_jsonl_samples
from mole_trainer.data.routing import build_routing_dataset, load_label_map, routing_stats_path
from mole_trainer.errors import UserError

# the synth_data fixture (conftest.SMALL_COUNTS) has 12 + 4 + 6 = 22 records per expert
PER_EXPERT = 22


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
    assert_reconciles(stats)


def assert_reconciles(stats):
    """Every input record is kept, dropped (duplicate, conflict) or unused; repeats are extra."""
    for name, c in stats["counts"].items():
        kept = sum(c.values()) - stats["oversampled"][name]
        dropped = stats["duplicates_dropped"][name] + stats["conflicts_dropped"][name]
        assert kept + dropped + stats["unused_for_balance"][name] == stats["input_records"][name]
    assert stats["records"] == sum(sum(c.values()) for c in stats["counts"].values())


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


def test_two_builds_are_byte_equal(synth_data, tmp_path):
    cfg = config(synth_data, ["calendar", "ocr", "login-window"], train_per_expert=8, oversample=True, seed=3)
    a, b = tmp_path / "a/r.jsonl", tmp_path / "b/r.jsonl"
    stats_a, stats_b = build_routing_dataset(cfg, a), build_routing_dataset(cfg, b)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "label_map.json").read_bytes() == (b.parent / "label_map.json").read_bytes()
    assert {k: v for k, v in stats_a.items() if k != "output"} == {
        k: v for k, v in stats_b.items() if k != "output"
    }
    assert json.loads(routing_stats_path(a).read_text())["seed"] == 3


def test_proportional_with_weight_target_and_cap(synth_data, tmp_path):
    names = ["calendar", "chart-screen", "login-window", "ocr"]
    cfg = config(
        synth_data,
        names,
        strategy="proportional",
        max_records_per_expert=12,
        val_per_expert=2,
        test_per_expert=4,
    )
    cfg.experts["calendar"].weight = 0.5
    cfg.experts["ocr"].target = 5
    stats = build_routing_dataset(cfg, tmp_path / "r.jsonl")
    available = PER_EXPERT - 2 - 4
    assert stats["train_available"] == dict.fromkeys(names, available)
    train = {e: c["train"] for e, c in stats["counts"].items()}
    # calendar: half its own records; chart-screen and login-window: all, capped; ocr: its target
    assert train == {"calendar": available // 2, "chart-screen": 12, "login-window": 12, "ocr": 5}
    assert stats["imbalance_ratio"] == round(12 / 5, 3)
    assert stats["strategy"] == "proportional" and not any(stats["oversampled"].values())
    assert_reconciles(stats)


def test_balanced_weight_scales_every_target_when_data_is_short(synth_data, tmp_path):
    cfg = config(synth_data, ["calendar", "ocr"], train_per_expert=10, val_per_expert=2, test_per_expert=4)
    cfg.experts["calendar"].weight = 2.0  # wants 20 of the 16 it has
    stats = build_routing_dataset(cfg, tmp_path / "r.jsonl")
    assert stats["train_targets"] == {"calendar": 20, "ocr": 10}
    assert {e: c["train"] for e, c in stats["counts"].items()} == {"calendar": 16, "ocr": 8}
    assert any("scaled by 0.800 because calendar" in w for w in stats["warnings"])
    assert_reconciles(stats)


def test_oversample_repeats_train_records_only_and_reaches_the_target(synth_data, tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = config(
        synth_data,
        ["calendar", "ocr"],
        train_per_expert=40,
        max_records_per_expert=35,
        oversample=True,
        val_per_expert=2,
        test_per_expert=4,
    )
    stats = build_routing_dataset(cfg, out)
    unique = PER_EXPERT - 2 - 4
    for e in ("calendar", "ocr"):
        assert stats["counts"][e] == {"train": 35, "val": 2, "test": 4}
        assert stats["oversampled"][e] == 35 - unique
    assert stats["imbalance_ratio"] == 1.0
    assert_reconciles(stats)
    samples = load_jsonl_samples(out)  # ids stay unique (a repeat carries its repeat number)
    repeats = [s for s in samples if s.metadata.get("oversample_repeat")]
    assert len(repeats) == 2 * (35 - unique) and {s.split for s in repeats} == {"train"}
    # each train record is used twice before any is used a third time
    uses = {}
    for s in samples:
        if s.split == "train":
            uses[(s.expert, s.metadata["source_id"])] = uses.get((s.expert, s.metadata["source_id"]), 0) + 1
    assert set(uses.values()) == {2, 3}
    assert check_routing_dataset(out)["violations"] == []
    # the seed picks which records are repeated
    other = build_routing_dataset(DatasetConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "seed1/r.jsonl")
    assert other["seed"] == 1
    ids = {
        s.id for s in load_jsonl_samples(tmp_path / "seed1/r.jsonl") if s.metadata.get("oversample_repeat")
    }
    assert ids != {s.id for s in repeats}


def test_val_fraction_and_short_splits_warned(synth_data, tmp_path):
    cfg = config(synth_data, ["calendar", "ocr"], train_per_expert=5, val_fraction=0.25, test_per_expert=4)
    stats = build_routing_dataset(cfg, tmp_path / "r.jsonl")
    val = int(0.25 * (PER_EXPERT - 4) + 0.5)
    assert all(c == {"train": 5, "val": val, "test": 4} for c in stats["counts"].values())
    assert "warnings" not in stats
    cfg = config(synth_data, ["calendar"], train_per_expert=5, val_per_expert=2, test_per_expert=30)
    stats = build_routing_dataset(cfg, tmp_path / "short.jsonl")
    assert stats["counts"]["calendar"]["test"] == PER_EXPERT
    assert any("fewer val/test records than asked" in w for w in stats["warnings"])
    assert stats["imbalance_ratio"] is None and any("no train records" in w for w in stats["warnings"])


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("experts: {a: {path: x, wieght: 2}}", "unknown key 'experts.a.wieght' (did you mean 'weight'?)"),
        ("experts: {a: {path: x, target: 5, weight: 2}}", "experts.a.target: give either target"),
        ("experts: {a: {path: x, target: ten}}", "experts.a.target: expected an integer"),
        ("experts: {a: {path: x, weight: 0}}", "experts.a.weight: must be > 0"),
        ("strategy: uniform", "strategy: must be one of balanced, proportional"),
        ("strategy: proportional\ntrain_per_expert: 5", "train_per_expert: applies to strategy 'balanced'"),
        ("val_per_expert: 3\nval_fraction: 0.1", "val_fraction: give either val_per_expert"),
        ("val_fraction: 1.5", "val_fraction: must be in [0, 1)"),
        ("max_records_per_expert: 0", "max_records_per_expert: must be >= 1"),
        ("oversample: yes please", "oversample: expected true or false"),
        ("test_per_expert: -1", "test_per_expert: must be >= 0"),
    ],
)
def test_config_validation(tmp_path, yaml_text, message):
    f = tmp_path / "dataset.yaml"
    f.write_text(yaml_text + "\n")
    with pytest.raises(UserError, match=re.escape(message)) as exc:
        load_config(f, DatasetConfig)
    assert str(f) in str(exc.value)


def test_configs_built_in_code_are_checked_too(synth_data, tmp_path):
    cfg = config(synth_data, ["ocr"], strategy="proportional", train_per_expert=3)
    with pytest.raises(UserError, match="train_per_expert: applies to strategy 'balanced'"):
        build_routing_dataset(cfg, tmp_path / "r.jsonl")
    cfg = config(synth_data, ["ocr"])
    cfg.experts["ocr"].target = 0
    with pytest.raises(UserError, match=r"experts\.ocr\.target: must be >= 1"):
        build_routing_dataset(cfg, tmp_path / "r.jsonl")


def _count_image_opens(monkeypatch) -> collections.Counter:
    """open() calls on .png files from now on (shutil, PIL and pathlib open through builtins/io), by path."""
    opens: collections.Counter = collections.Counter()
    real = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, str | Path) and str(file).endswith(".png"):
            opens[Path(file).resolve()] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return opens


def test_each_image_is_read_once_to_decode_and_hash_it(synth_data, tmp_path, monkeypatch):
    names = ["calendar", "ocr"]
    inputs = {p.resolve() for n in names for p in (synth_data / n / "images").iterdir()}
    opens = _count_image_opens(monkeypatch)
    out = tmp_path / "r" / "routing.jsonl"
    build_routing_dataset(
        config(synth_data, names, train_per_expert=6, val_per_expert=2, test_per_expert=3), out
    )
    copied = len(list((out.parent / "images").iterdir()))
    assert 0 < copied < len(inputs) and set(opens) >= inputs
    # once to decode and hash, and a second time only for the images copied into the routing folder
    assert max(opens[p] for p in inputs) == 2 and sum(opens[p] for p in inputs) == len(inputs) + copied
    opens.clear()
    assert check_routing_dataset(out.parent)["violations"] == []
    assert sorted(opens.values()) == [1] * copied


def test_an_image_that_does_not_decode_names_its_record(synth_data, tmp_path):
    ds = tmp_path / "calendar"
    shutil.copytree(synth_data / "calendar", ds)
    line = (ds / "val.jsonl").read_text().splitlines()[1]
    image = ds / json.loads(line)["images"][0]
    image.write_bytes(image.read_bytes()[:200])  # truncated: the header reads, the pixels do not
    cfg = DatasetConfig(experts={"calendar": ExpertSource(str(ds))}, train_per_expert=4, test_per_expert=2)
    where = re.escape(f"{ds / 'val.jsonl'}:2 (id {json.loads(line)['id']}): images[0]: image '{image}'")
    with pytest.raises(UserError, match=where + " cannot be decoded"):
        build_routing_dataset(cfg, tmp_path / "r" / "routing.jsonl")
    assert not (tmp_path / "r" / "routing.jsonl").exists()


def test_an_image_named_by_a_single_image_field_is_named_so_and_an_unreadable_one_is_a_user_error(
    synth_data, tmp_path
):
    from mole_trainer.data.records import decoded_image_digest

    ds = tmp_path / "calendar"
    shutil.copytree(synth_data / "calendar", ds)
    lines = (ds / "val.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["image"] = record.pop("images")[0]  # one image as 'image' (LLaVA style)
    (ds / "val.jsonl").write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    image = ds / record["image"]
    image.write_bytes(image.read_bytes()[:200])
    cfg = DatasetConfig(experts={"calendar": ExpertSource(str(ds))}, train_per_expert=4, test_per_expert=2)
    where = re.escape(f"{ds / 'val.jsonl'}:2 (id {record['id']}): image[0]: image '{image}'")
    with pytest.raises(UserError, match=where + " cannot be decoded"):
        build_routing_dataset(cfg, tmp_path / "r" / "routing.jsonl")
    with pytest.raises(UserError, match=re.escape(f"x.jsonl:3: image '{tmp_path / 'gone.png'}' cannot be")):
        decoded_image_digest(tmp_path / "gone.png", "x.jsonl:3")  # removed after the record was read
