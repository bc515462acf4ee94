"""Output-folder locks: refusal naming the holder, takeover of a dead holder, the lease with a fake clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mole_trainer import locking
from mole_trainer.errors import UserError
from mole_trainer.layout import LOCK_FILE
from mole_trainer.locking import LockHeld, OutputLock, output_locks, process_start


class Clock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_refused_naming_holder_until_released(tmp_path: Path):
    first = OutputLock(tmp_path / "out", "train.router", renew_every=None).acquire()
    holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["stage"] == "train.router"
    assert holder["pid_start"] == process_start(os.getpid()) and holder["command"]
    with pytest.raises(LockHeld, match=f"pid {os.getpid()} on {holder['host']}") as exc:
        OutputLock(tmp_path / "out", "train.router", renew_every=None).acquire()
    assert holder["command"] in str(exc.value)
    first.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with OutputLock(tmp_path / "out", "train.router", renew_every=None):
        pass
    # no temporary files left either, and a folder the run made and left empty is removed
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    with OutputLock(tmp_path / "kept", "train.router", renew_every=None):
        pass
    assert os.listdir(tmp_path / "kept") == []


def test_released_on_exception(tmp_path: Path):
    with pytest.raises(RuntimeError), OutputLock(tmp_path, "data.preprocess", renew_every=0.01):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path):
    stale = OutputLock(tmp_path, "train.router", pid=dead_pid(), renew_every=None).acquire()
    messages = []
    taker = OutputLock(tmp_path, "train.router", renew_every=None, warn=messages.append).acquire()
    assert [h["pid"] for h in taker.taken_over] == [stale.pid]
    assert "is gone" in messages[0] and f"pid {stale.pid}" in messages[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == taker.token
    stale.release()  # the old holder's release leaves the new lock alone
    assert (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path):
    holder = OutputLock(tmp_path, "train.router", renew_every=None).acquire()
    data = json.loads(holder.path.read_text())
    holder.path.write_text(json.dumps({**data, "pid_start": data["pid_start"] - 1}))  # started earlier
    taker = OutputLock(tmp_path, "train.router", renew_every=None, warn=lambda m: None).acquire()
    assert taker.taken_over


def test_lease_renewals_keep_it_expiry_allows_takeover(tmp_path: Path):
    clock = Clock()
    kw = {"clock": clock, "lease_s": 60, "shared": True, "renew_every": None}
    holder = OutputLock(tmp_path, "train.experts", **kw).acquire()  # alive, but pids are not trusted
    clock.now += 50
    assert holder.renew()
    clock.now += 50  # 100 s after the start, 50 s after the renewal
    with pytest.raises(LockHeld, match="locked by another run"):
        OutputLock(tmp_path, "train.experts", **kw).acquire()
    clock.now += 11  # 61 s without a renewal
    messages = []
    taker = OutputLock(tmp_path, "train.experts", **kw, warn=messages.append).acquire()
    assert taker.taken_over and "lease expired 1 s ago" in messages[0]
    assert not holder.renew(), "the old holder must notice it lost the lock"
    assert json.loads(holder.path.read_text())["token"] == taker.token


def test_another_hosts_lock_is_a_lease_even_when_not_shared(tmp_path: Path):
    clock = Clock()
    OutputLock(tmp_path, "deploy", clock=clock, host="elsewhere", pid=dead_pid(), renew_every=None).acquire()
    mine = {"clock": clock, "shared": False, "renew_every": None, "warn": lambda m: None}
    with pytest.raises(LockHeld, match="on elsewhere"):  # its pid means nothing here
        OutputLock(tmp_path, "deploy", **mine).acquire()
    clock.now += 61
    assert OutputLock(tmp_path, "deploy", **mine).acquire().taken_over


def test_heartbeat_thread_renews_while_the_run_lives(tmp_path: Path):
    clock = Clock()
    lock = OutputLock(tmp_path, "train.router", clock=clock, shared=True, renew_every=0.01).acquire()
    first = json.loads(lock.path.read_text())["expires_at"]
    clock.now += 30
    deadline = time.monotonic() + 10
    while json.loads(lock.path.read_text())["expires_at"] == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.01)
    assert json.loads(lock.path.read_text())["expires_at"] == clock.now + lock.lease_s
    lock.release()


def test_publisher_sees_every_write(tmp_path: Path):
    seen = []
    locking.set_publisher(seen.append)
    try:
        with OutputLock(tmp_path, "deploy", renew_every=None) as lock:
            lock.renew()
    finally:
        locking.set_publisher(None)
    assert seen == [tmp_path / LOCK_FILE] * 3  # acquire, renewal, release


def test_several_folders_all_or_none(tmp_path: Path):
    busy = OutputLock(tmp_path / "b", "train.experts", renew_every=None).acquire()
    with pytest.raises(LockHeld), output_locks([tmp_path / "a", tmp_path / "b"], "train.experts"):
        pass
    assert not (tmp_path / "a" / LOCK_FILE).exists(), "the lock taken first is released again"
    busy.release()


def test_lock_file_is_not_data(tmp_path: Path):
    from mole_trainer.data.preprocess import dataset_digest
    from mole_trainer.train.checkpoint import data_identity

    (tmp_path / "meta.json").write_text("{}")
    before = dataset_digest(tmp_path), data_identity(tmp_path)
    with OutputLock(tmp_path, "data.preprocess", renew_every=None):
        assert (dataset_digest(tmp_path), data_identity(tmp_path)) == before


def test_a_lock_renewed_or_replaced_since_it_was_judged_is_not_removed(tmp_path: Path):
    stale = OutputLock(tmp_path, "train.router", pid=dead_pid(), renew_every=None).acquire()
    judged = json.loads(stale.path.read_text())
    stale.renew()  # the content changed after the taker read it: a taker must look again
    taker = OutputLock(tmp_path, "train.router", renew_every=None)
    assert not taker._break(judged)
    assert json.loads(stale.path.read_text())["token"] == stale.token


def test_unusable_folder_is_a_user_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        OutputLock(tmp_path / "file", "deploy", renew_every=None).acquire()
    with pytest.raises(UserError, match="cannot take the output lock"):  # below a file: mkdir fails
        OutputLock(tmp_path / "file" / "out", "deploy", renew_every=None).acquire()


def test_a_folder_removed_just_before_the_lock_is_written_is_made_again_and_removed_on_release(
    tmp_path: Path, monkeypatch
):
    """Another run that had made the (empty) folder removed it on release between our mkdir and our
    write: the lock is taken in a folder made again, which this run now removes when it leaves it empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    real_write, removed = OutputLock._write_tmp, []

    def remove_first(self, data):
        if not removed:
            folder.rmdir()
            removed.append(folder)
        return real_write(self, data)

    monkeypatch.setattr(OutputLock, "_write_tmp", remove_first)
    lock = OutputLock(folder, "deploy.load", renew_every=None).acquire()
    assert removed and lock.read()["token"] == lock.token
    lock.release()
    assert not folder.exists()


@pytest.mark.parametrize("when", ["before-break", "break-file-gone"])
def test_a_taker_of_a_dead_lock_whose_folder_or_break_file_vanishes_retries(
    tmp_path: Path, monkeypatch, when
):
    """Taking over a dead holder's lock while another loader empties and removes the folder (or finishes
    its own takeover and removes its break file) is a retry, not a failed load."""
    import shutil

    folder = tmp_path / "out"
    OutputLock(folder, "deploy.load", pid=dead_pid(), renew_every=None).acquire()  # never released
    brk = folder / (LOCK_FILE + locking._BREAK_SUFFIX)
    real_break, done = OutputLock._break, []

    def interfere(self, holder):
        if not done:
            done.append(when)
            if when == "before-break":
                shutil.rmtree(folder)
            else:  # another taker holds the break file, and removes it as we look at its age
                brk.write_text("")
                real_stat = Path.stat

                def stat_after_the_other_taker_left(path, **kw):
                    if path == brk:
                        path.unlink()
                    return real_stat(path, **kw)

                monkeypatch.setattr(Path, "stat", stat_after_the_other_taker_left)
                try:
                    return real_break(self, holder)
                finally:
                    monkeypatch.setattr(Path, "stat", real_stat)
        return real_break(self, holder)

    monkeypatch.setattr(OutputLock, "_break", interfere)
    lock = OutputLock(folder, "deploy.load", renew_every=None).acquire()
    assert done == [when] and lock.read()["token"] == lock.token
    lock.release()
