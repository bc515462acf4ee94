"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `step-NNNNNNNN/` holding `state.pt` (trainable weights, the best weights
so far, optimizer, scheduler, batch-stream position, RNG states) and `trainer_state.json` (step,
best metrics, early-stopping counter, the log so far, the settings it was made with). It is written
into a hidden temporary folder, every file fsync'd, then renamed into place (atomic.replace_folder), so a
kill during a save leaves the previous checkpoint as the newest complete one. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic import replace_folder
from ..errors import UserError

STATE_FILE = "state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# TrainSpec keys that never change the trained weights: a run may resume with other values
OUTSIDE_RESUME_IDENTITY = ("data_workers", "prefetch_batches", "log_every")
BEST_DIR, BEST_TMP, BEST_OLD = "best", ".best.tmp", ".best.old"  # the best adapter so far, and its swap
# Fault injection for the kill-during-save test: seconds to sleep between the two files of a save.
SAVE_DELAY_ENV = "MOLE_TEST_CHECKPOINT_SAVE_DELAY"
_saved_hook: Callable[[Path], None] | None = None


def step_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimiser step `step`."""
    return root / f"step-{step:08d}"


def rng_states() -> dict:
    """Every random generator training can touch: torch (CPU and CUDA), Python and NumPy.

    Only tensors and plain lists/numbers, so a checkpoint loads with torch.load(weights_only=True).
    """
    import random

    import numpy as np
    import torch

    version, keys, gauss = random.getstate()
    kind, np_keys, np_pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": [kind, np_keys.tolist(), int(np_pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    """Put back the generators saved by `rng_states`."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, np_pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(np_keys, dtype=np.uint32), np_pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def set_saved_hook(fn: Callable[[Path], None] | None) -> None:
    """Call `fn(folder)` after every checkpoint save (a Modal app commits its Volume there)."""
    global _saved_hook
    _saved_hook = fn


def save_checkpoint(root: Path, step: int, state: dict, trainer_state: dict, keep: int) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`; returns its folder."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    # `final` exists when the same step is saved again after a resume from an older checkpoint
    replace_folder(tmp, final, root / f".{final.name}.old.tmp", durable=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if _saved_hook:
        _saved_hook(final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def load_latest(root: Path, report=print) -> tuple[dict, dict, Path] | None:
    """(state, trainer_state, folder) of the newest loadable checkpoint, or None when there is none.

    A checkpoint that fails to load (e.g. a disk error after it was written) is reported and the
    next older one is tried. When checkpoints exist but none loads, this raises UserError rather
    than returning None: a caller would start afresh and clear them, deleting an interrupted run.
    """
    import pickle

    import torch

    found = list_checkpoints(root)
    failures = []
    for folder in reversed(found):
        try:
            trainer_state = json.loads((folder / TRAINER_STATE_FILE).read_text())
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged checkpoint must not hide an older good one
            report(f"warning: checkpoint {folder} cannot be read ({exc}); trying an older one")
            failures.append(exc)
            continue
        return state, trainer_state, folder
    if not found:
        return None
    # weights_only=True refuses the pickled Python/NumPy RNG states that earlier versions stored
    older = any(isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e) for e in failures)
    why = (
        "they are in an older format, written by an earlier mole-trainer"
        if older
        else f"the newest fails with: {_short(str(failures[0]), 200)}"
    )
    raise UserError(
        f"{root}: none of its {len(found)} checkpoint(s) can be read ({why}); nothing was deleted. "
        "Start again without --resume (which clears them) or move the folder aside"
    )


def data_identity(folder: str | Path) -> str:
    """Cheap identity of a preprocessed data folder: its meta.json bytes plus each file's name and size.

    Recorded in checkpoints so a run is never resumed onto other data; meta.json records the digest
    of the data the cache was made from. Modification times are left out on purpose: a Volume or a
    copy may not keep them, and a retry must still resume. A preprocess run's lock file is not data.
    """
    from ..hashing import listing_digest
    from ..layout import LOCK_FILE, PREPROCESS_META_FILE

    return listing_digest(folder, head=PREPROCESS_META_FILE, skip_prefix=LOCK_FILE)


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def weight_settings(spec) -> dict:
    """A TrainSpec's settings that decide the trained weights (what a resumed run must match)."""
    from ..config import to_dict

    return {k: v for k, v in to_dict(spec).items() if k not in OUTSIDE_RESUME_IDENTITY}


def _decides_weights(key: str) -> bool:
    # "name.log_every": an expert's own setting in a concurrent run's settings
    return key.rsplit(".", 1)[-1] not in OUTSIDE_RESUME_IDENTITY


def check_resumable(trainer_state: dict, settings: dict, folder: Path) -> None:
    """Refuse to resume from a checkpoint made with other settings (the result would not be exact).

    Settings outside the weights (OUTSIDE_RESUME_IDENTITY) are not compared, also where an older
    checkpoint recorded them.
    """
    saved = trainer_state.get("settings", {})
    keys = {k for k in set(saved) | set(settings) if _decides_weights(k)}
    diff = sorted(k for k in keys if saved.get(k) != settings.get(k))
    if diff:
        detail = ", ".join(f"{k}: {_short(saved.get(k))} -> {_short(settings.get(k))}" for k in diff)
        raise UserError(
            f"{folder}: cannot resume, this run's settings differ from the checkpoint's ({detail}); "
            "restore them or start without --resume"
        )


def remove_partial(root: Path) -> None:
    """Clean up after a save killed half-way: drop temporary folders, put back a best adapter moved aside.

    A complete checkpoint is never removed.
    """
    if not root.is_dir():
        return
    for p in [*root.glob(".step-*.tmp"), root / BEST_TMP]:
        shutil.rmtree(p, ignore_errors=True)
    best, old = root / BEST_DIR, root / BEST_OLD
    if old.is_dir():
        if best.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, best)


def clear_checkpoints(root: Path) -> None:
    """Remove an earlier run's checkpoints and best adapter (a fresh run must not mix with them)."""
    for p in list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)
    remove_partial(root)
    shutil.rmtree(root / BEST_DIR, ignore_errors=True)
