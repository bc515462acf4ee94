"""Content hashes that caches and run records store: stable across releases, sensitive to what they cover."""

from __future__ import annotations

from pathlib import Path

from mole_trainer import hashing
from mole_trainer.model.loading import processor_digest

PROCESSOR = Path(__file__).parents[1] / "fixtures" / "qwen3-vl-8b-processor"


def test_recorded_digests_keep_their_values():
    # stored in stage records and preprocessed caches: a changed formula would silently redo or refuse them
    assert hashing.fingerprint("a", {"b": [1, 2]}, 3.5) == "621dbb7ec735e735"
    assert (
        processor_digest(str(PROCESSOR)) == "4ca9a0c864c6455cba057eee995cbcc91e3a6b8c9b46e446512daf5adc71c40f"
    )


def test_fingerprint_ignores_key_order_only():
    assert hashing.fingerprint({"x": 1, "y": 2}) == hashing.fingerprint({"y": 2, "x": 1})
    assert hashing.fingerprint({"x": 1}) != hashing.fingerprint({"x": 2})
    assert hashing.fingerprint("a", "b") != hashing.fingerprint("ab")


def test_named_files_digest_covers_names_bytes_and_order(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    base = hashing.named_files_digest([("a", a), ("b", b)])
    assert hashing.named_files_digest([("b", b), ("a", a)]) != base
    assert hashing.named_files_digest([("a", a), ("c", b)]) != base
    b.write_bytes(b"3")
    assert hashing.named_files_digest([("a", a), ("b", b)]) != base


def test_code_digest_follows_code_and_configs_only(tmp_path: Path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "m.py").write_text("x = 1\n")
    (pkg / "configs" / "c.yaml").write_text("a: 1\n")
    monkeypatch.setattr(hashing, "__file__", str(pkg / "hashing.py"))
    base = hashing.code_digest()
    (pkg / "notes.txt").write_text("not code")
    assert hashing.code_digest() == base
    (pkg / "configs" / "c.yaml").write_text("a: 2\n")
    changed = hashing.code_digest()
    assert changed != base
    (pkg / "m.py").write_text("x = 2\n")
    assert hashing.code_digest() != changed
