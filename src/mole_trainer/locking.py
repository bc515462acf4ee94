"""One writer per output folder: an exclusive lock file inside the folder for the whole run.

The lock is ``FOLDER/.mole-lock.json`` (layout.LOCK_FILE), a JSON object: host, pid, pid_start (the
process start time from /proc, against pid reuse), started_at, command, stage, folder, token, lease_s,
renewed_at and expires_at (seconds since the epoch). It is created atomically: written to a private
temporary file, then hard-linked to the lock name, which fails if a lock is there (O_CREAT|O_EXCL
where hard links are not supported). A background thread rewrites renewed_at/expires_at every
lease_s / 4 seconds while the run lives, and the lock is removed when the run ends, normally or not.

A second writer meeting a lock:
- a lock of this host whose process is gone (no such pid, a zombie, or a pid reused by a process
  that started later) is taken over, with a message;
- a lock of another host, or any lock when MOLE_LOCK_SHARED=1 (a shared Volume: pids and host
  names mean nothing across containers), is a lease: taken over once expires_at has passed;
- otherwise the writer fails at once with a UserError (exit 2) naming the holder.
Lease expiry compares clocks of different machines: they are assumed to agree within seconds.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from .atomic import fsync_file, replacing
from .errors import UserError
from .layout import LOCK_FILE, LOCK_LEASE_S, LOCK_SHARED_ENV

_BREAK_SUFFIX = ".break"  # held (O_EXCL) while a stale lock is removed, so two takers never race
_BREAK_STALE_S = 10.0  # a break file older than this was left by a killed taker
_publish: Callable[[Path], None] | None = None


class LockHeld(UserError):
    """The output folder is locked by a live writer."""


def set_publisher(fn: Callable[[Path], None] | None) -> None:
    """Call `fn(lock_path)` after each write or removal of a lock (a Modal app commits its Volume)."""
    global _publish
    _publish = fn


def shared_volume() -> bool:
    """True when MOLE_LOCK_SHARED says output folders are on a Volume shared by machines."""
    return os.environ.get(LOCK_SHARED_ENV, "").strip().lower() in ("1", "true", "yes")


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or parentheses
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) if fields[0] != "Z" else -1  # -1: a zombie, already dead


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` of this host still runs (and, given its start time, is the same process).

    Without /proc (not Linux) only the pid is checked, so a reused pid reads as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now_start = process_start(pid)
    if now_start == -1:
        return False
    return start is None or now_start is None or now_start == start


def describe(holder: dict) -> str:
    """One line naming a lock's holder: pid, host, start time and command."""
    if "pid" not in holder:
        return "an unreadable lock (being written, or damaged)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started_at')} "
        f"({holder.get('stage')}: {holder.get('command')})"
    )


class OutputLock:
    """The exclusive lock of one output folder; use as a context manager (acquire ... release).

    `clock` (seconds since the epoch) and `host`/`pid` are injectable for tests; `renew_every` is
    the heartbeat period (None: no background thread, call renew() yourself).
    """

    def __init__(
        self,
        folder: str | Path,
        stage: str,
        *,
        clock: Callable[[], float] = time.time,
        lease_s: float = LOCK_LEASE_S,
        shared: bool | None = None,
        host: str | None = None,
        pid: int | None = None,
        renew_every: float | None = LOCK_LEASE_S / 4,
        warn: Callable[[str], None] | None = None,
    ):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.stage = stage
        self.clock = clock
        self.lease_s = lease_s
        self.shared = shared_volume() if shared is None else shared
        self.host = host or platform.node()
        self.pid = os.getpid() if pid is None else pid
        self.renew_every = renew_every
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self.token = uuid.uuid4().hex
        self.taken_over: list[dict] = []  # the stale holders this lock replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._created_folder = False  # this run made the folder: remove it if it is left empty

    # ------------------------------------------------------------------ the lock's content

    def _content(self) -> dict:
        now = self.clock()
        return {
            "host": self.host,
            "pid": self.pid,
            "pid_start": process_start(self.pid) if self.pid == os.getpid() else None,
            "started_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
            "stage": self.stage,
            "folder": str(self.folder.resolve()),
            "token": self.token,
            "shared": self.shared,
            "lease_s": self.lease_s,
            "renewed_at": now,
            "expires_at": now + self.lease_s,
        }

    def read(self) -> dict | None:
        """The current lock's content; None when there is no lock, {} when it cannot be parsed."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _tmp(self) -> Path:
        # named after the lock, so hashes of a folder's data leave it out like the lock itself
        return self.folder / f"{LOCK_FILE}.{self.token}.tmp"

    def _write_tmp(self, data: dict) -> Path:
        tmp = self._tmp()
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        fsync_file(tmp)
        return tmp

    def _create(self) -> bool:
        """Create the lock atomically; False if one is there."""
        tmp = self._write_tmp(self._content())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(tmp.read_text())
        finally:
            tmp.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ judging a holder

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None when its writer may still be running."""
        now = self.clock()
        if not holder or "pid" not in holder or "host" not in holder:
            # unreadable: a lock being written by the O_EXCL fallback, or damaged; file times are real time
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            return f"unreadable lock file {age:.0f} s old" if age > self.lease_s else None
        lease = holder.get("shared") or self.shared or holder.get("host") != self.host
        if lease:
            expires = float(holder.get("expires_at", 0))
            if now <= expires:
                return None
            return (
                f"its lease expired {now - expires:.0f} s ago (not renewed since {holder.get('renewed_at')})"
            )
        if process_alive(int(holder["pid"]), holder.get("pid_start")):
            return None
        return f"its process {holder['pid']} on {holder['host']} is gone"

    def _break(self, holder: dict) -> bool:
        """Remove a stale lock if it is still `holder`'s; False when another taker is at it."""
        brk = self.path.with_name(LOCK_FILE + _BREAK_SUFFIX)
        try:
            fd = os.open(brk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - brk.stat().st_mtime > _BREAK_STALE_S:
                    brk.unlink(missing_ok=True)
            except FileNotFoundError:  # the other taker has just finished
                pass
            return False
        except FileNotFoundError:  # the folder went (its holder removed it, empty): _acquire retries
            return False
        try:
            if self.read() == holder:
                self.path.unlink()
                return True
            return False
        finally:
            os.close(fd)
            brk.unlink(missing_ok=True)

    # ------------------------------------------------------------------ acquire, renew, release

    def acquire(self) -> OutputLock:
        """Take the lock or raise LockHeld naming the holder; a stale lock is taken over with a message."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: exists and is not a folder; expected an output folder")
        try:
            self._created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._acquire()
        except OSError as exc:  # a read-only or full filesystem, no permission
            raise UserError(f"{self.folder}: cannot take the output lock {self.path}: {exc}") from exc

    def _acquire(self) -> OutputLock:
        for _ in range(20):
            try:
                created = self._create()
            except FileNotFoundError:
                # the folder went after acquire() made it: a holder that had made it removed it, empty, on
                # release. Make it again (now ours to remove if left empty) and retry.
                self._created_folder = True
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            if created:
                self._held = True
                self._published()
                if self.renew_every:
                    self._thread = threading.Thread(target=self._heartbeat, name="mole-lock", daemon=True)
                    self._thread.start()
                return self
            holder = self.read()
            if holder is None:
                continue  # released meanwhile
            reason = self.stale_reason(holder)
            if reason is None:
                raise LockHeld(
                    f"{self.folder}: output folder is locked by another run: {describe(holder)}; "
                    f"wait for it to finish (lock file {self.path})"
                )
            if self._break(holder):
                self.taken_over.append(holder)
                self.warn(f"{self.folder}: taking over the lock of {describe(holder)}: {reason}")
            else:
                time.sleep(0.05)
        raise LockHeld(
            f"{self.folder}: could not take the lock {self.path} (other writers keep racing for it)"
        )

    def renew(self) -> bool:
        """Push the lease's expiry forward; False (and a message) if the lock is no longer this run's."""
        current = self.read()
        if not current or current.get("token") != self.token:
            self.warn(f"{self.folder}: this run lost its lock to {describe(current or {})}")
            return False
        now = self.clock()
        data = {**current, "renewed_at": now, "expires_at": now + self.lease_s}
        with replacing(self.path, durable=True, tmp=self._tmp()) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
        self._published()
        return True

    def release(self) -> None:
        """Stop renewing and remove the lock (only if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held:
            self._held = False
            current = self.read()
            if current and current.get("token") == self.token:
                self.path.unlink(missing_ok=True)
                self._published()
            if self._created_folder:
                # a run refused before writing (a deploy gate, a bad config) leaves no empty folder
                with suppress(OSError):
                    self.folder.rmdir()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a transient filesystem or Volume error: the next beat tries again
                self.warn(f"{self.folder}: could not renew the lock: {type(exc).__name__}: {exc}")

    def _published(self) -> None:
        if _publish is not None:
            _publish(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_written(folders: Sequence[str | Path], what: str) -> None:
    """Raise LockHeld when a live run is writing one of `folders` (a reader must not copy half a save).

    Only checks: a reader takes no lock, and a stale lock (its writer gone) is no reason to refuse.
    """
    for folder in folders:
        lock = OutputLock(folder, "read", renew_every=None)
        holder = lock.read()
        if holder is not None and lock.stale_reason(holder) is None:
            raise LockHeld(
                f"{folder}: {what} is being written by another run: {describe(holder)}; "
                f"wait for it to finish (lock file {lock.path})"
            )


@contextmanager
def output_locks(folders: Sequence[str | Path], stage: str, **kwargs) -> Iterator[list[OutputLock]]:
    """Lock several output folders (in sorted order) for the enclosed block; all or none are held."""
    with ExitStack() as stack:
        locks = [
            stack.enter_context(OutputLock(folder, stage, **kwargs))
            for folder in sorted({Path(f).resolve() for f in folders})
        ]
        yield locks
