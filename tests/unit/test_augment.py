"""Augmented routing records: benign rewrites of train instructions (dataset.yaml `augment`)."""

import json
import random

import pytest

from mole_trainer.config import AugmentSpec, DatasetConfig, ExpertSource, load_config
from mole_trainer.data.check import check_routing_dataset
from mole_trainer.data.records import load_jsonl_samples
from mole_trainer.data.report import print_routing_stats
from mole_trainer.data.rewrites import REWRITES, canonical, lower_first, politely, rewrite
from mole_trainer.data.routing import build_routing_dataset
from mole_trainer.errors import UserError

NAMES = ["calendar", "chart-screen"]
# the synth_data fixture (conftest.SMALL_COUNTS) has 12 + 4 + 6 = 22 records per expert
PER_EXPERT = 22


def config(root, **kw):
    base = {"val_per_expert": 2, "test_per_expert": 4, "train_per_expert": 10}
    return DatasetConfig(experts={n: ExpertSource(path=str(root / n)) for n in NAMES}, **{**base, **kw})


def test_each_family_changes_the_words_not_the_request():
    rng = random.Random(0)
    for family in REWRITES:
        outs = {rewrite("Click on the 3rd.", [family], rng) for _ in range(30)}
        assert None not in outs and "Click on the 3rd." not in outs
        # every rewrite keeps the request's words (case and the polite words aside)
        assert all("on the 3rd" in o.lower() for o in outs)
    punct = {rewrite("Click on the 3rd.", ["punctuation"], rng) for _ in range(30)}
    assert {"Click on the 3rd", "Click on the 3rd..", "Click on the 3rd!"} <= punct
    polite = {rewrite("Which bar is highest?", ["polite"], rng) for _ in range(60)}
    assert "Could you tell me which bar is highest?" in polite and "Which bar is highest? Thanks." in polite
    # a question keeps a question's polite prefix whatever else is rewritten
    for _ in range(100):
        out = rewrite("Which bar is highest?", list(REWRITES), rng)
        assert not out.lower().startswith(("please which", "could you which", "kindly which")), out
    # a change the router cannot see (case), or nothing left of the request: no copy, not a duplicate
    assert (
        rewrite(
            "Click on the 3rd.",
            ["punctuation"],
            rng,
            avoid={"click on the 3rd", "click on the 3rd..", "click on the 3rd!"},
        )
        is None
    )
    assert rewrite("?", ["punctuation"], rng) is None
    assert lower_first("OCR this.") == "OCR this." and lower_first("Open it") == "open it"
    assert politely("Open it.") == "Please open it." and politely("Who?") == "Could you tell me who?"


def test_augmented_copies_train_only_same_images_counted_and_reconciled(synth_data, tmp_path):
    out = tmp_path / "r.jsonl"
    stats = build_routing_dataset(config(synth_data, augment=AugmentSpec(copies=2, fraction=0.5)), out)
    samples = load_jsonl_samples(out)
    by_id = {s.id: s for s in samples}
    copies = [s for s in samples if s.metadata.get("augment_copy")]
    originals = [s for s in samples if s.split == "train" and not s.metadata.get("augment_copy")]
    for e in NAMES:
        assert stats["augmented"][e] == 2 * 5  # half of the 10 train records, two copies each
        assert stats["counts"][e] == {"train": 10 + 10, "val": 2, "test": 4}
        kept = sum(stats["counts"][e].values()) - stats["oversampled"][e] - stats["augmented"][e]
        lost = stats["duplicates_dropped"][e] + stats["conflicts_dropped"][e] + stats["unused_for_balance"][e]
        assert kept + lost == stats["input_records"][e] == PER_EXPERT
    assert len(copies) == 20 and len(originals) == 20 and {s.split for s in copies} == {"train"}
    assert stats["augment"] == {"copies": 2, "fraction": 0.5, "rewrites": list(REWRITES), "seed": 0}
    for c in copies:
        source = by_id[c.id.split("#aug")[0]]
        assert c.id.endswith(f"#aug{c.metadata['augment_copy']}")
        assert c.images == source.images and c.expert == source.expert and c.answer == source.answer
        assert canonical(c.instruction) != canonical(source.instruction)
    two = [c for c in copies if c.metadata["augment_copy"] == 2]
    assert all(by_id[c.id.replace("#aug2", "#aug1")].instruction != c.instruction for c in two)
    report = check_routing_dataset(out)
    assert report["violations"] == [] and report["augmented_copies"] == 20
    # seeded: the same config writes the same bytes; another augment seed other rewrites
    again = tmp_path / "again" / "r.jsonl"
    build_routing_dataset(config(synth_data, augment=AugmentSpec(copies=2, fraction=0.5)), again)
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other" / "r.jsonl"
    build_routing_dataset(config(synth_data, augment=AugmentSpec(copies=2, fraction=0.5, seed=7)), other)
    assert other.read_bytes() != out.read_bytes()
    # off by default: no copies, nothing else changes
    plain = tmp_path / "plain" / "r.jsonl"
    stats = build_routing_dataset(config(synth_data), plain)
    assert stats["augmented"] == {e: 0 for e in NAMES} and stats["records"] == 2 * (10 + 2 + 4)
    assert [s.id for s in load_jsonl_samples(plain)] == [s.id for s in samples if s not in copies]


def test_table_shows_augmented_copies(synth_data, tmp_path):
    from rich.console import Console

    stats = build_routing_dataset(config(synth_data, augment=AugmentSpec(copies=1)), tmp_path / "r.jsonl")
    console = Console(record=True, width=200)
    print_routing_stats(stats, console)
    text = console.export_text()
    assert "augment: 1 rewritten copy of every train record (punctuation, polite; seed 0)" in text
    assert "aug" in text.splitlines()[2].split()
    row = next(line for line in text.splitlines() if line.strip().startswith("calendar"))
    assert row.split() == ["calendar", "20", "2", "4", "22", "0", "0", "6", "0", "10"]


def test_augmented_copy_outside_train_is_a_check_violation(synth_data, tmp_path):
    out = tmp_path / "r.jsonl"
    build_routing_dataset(config(synth_data, augment=AugmentSpec(copies=1)), out)
    lines = out.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "#aug1" in line)
    rec = json.loads(lines[i])
    rec["split"] = "test"
    lines[i] = json.dumps(rec)
    out.write_text("\n".join(lines) + "\n")
    violations = check_routing_dataset(out)["violations"]
    assert any(f"augmented copy '{rec['id']}' in split 'test'" in v for v in violations)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("augment: {copys: 2}\n", "unknown key 'augment.copys' (did you mean 'copies'?)"),
        ("augment: {copies: -1}\n", "augment.copies: must be >= 0"),
        ("augment: {copies: 1, fraction: 0}\n", "augment.fraction: must be in (0, 1]"),
        ("augment: {copies: 1, rewrites: [case, emoji]}\n", "augment.rewrites: expected distinct names"),
        ("augment: {copies: 1, rewrites: []}\n", "augment.rewrites: expected distinct names"),
    ],
)
def test_augment_config_checked(tmp_path, text, message):
    p = tmp_path / "dataset.yaml"
    p.write_text("experts: {}\n" + text)
    with pytest.raises(UserError, match=None) as e:
        load_config(p, DatasetConfig)
    assert message in str(e.value) and str(p) in str(e.value)


def test_rewritten_text_goes_back_where_the_request_stands():
    from mole_trainer.data.conversation import router_request, with_router_text

    turns = [
        {"role": "user", "content": [{"type": "text", "text": "Read it."}, {"type": "image"}]},
        {"role": "assistant", "content": "ok"},
    ]
    out = with_router_text(turns, "Please read it")
    assert out[0]["content"] == [{"type": "text", "text": "Please read it"}, {"type": "image"}]
    assert out[1] == turns[1] and turns[0]["content"][0]["text"] == "Read it."  # the source is untouched
    assert router_request(out) == "Please read it"
    # two user turns: no part-by-part mapping, the record falls back to the router's single-turn view
    two = [*turns, {"role": "user", "content": [{"type": "text", "text": "And this?"}]}, turns[1]]
    assert with_router_text(two, "x") is None
