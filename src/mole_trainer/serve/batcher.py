"""The micro-batcher: one worker thread owns the engine; request handlers only queue work and wait.

A batch starts with the first waiting request and takes whatever else arrives within `max_wait_s`,
up to `max_batch` requests; the engine then answers them together (one routing pass, one
mixed-expert generation). Handlers get a concurrent.futures.Future per request. When a batch fails,
its requests are answered again one by one, so only the culprit gets the error. A job whose future
was cancelled (its handler gave up) is skipped; the worker survives any error. Closing drains:
everything queued before close() is still answered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

_STOP = object()
log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request waiting for the engine, and when it was queued."""

    request: Any
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its batch went to the engine


class MicroBatcher:
    """Collect requests into batches for `run_batch(requests) -> results` (same order), on one thread."""

    def __init__(
        self,
        run_batch: Callable[[list], list],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch >= 1 and max_wait_s >= 0 expected, got {max_batch}, {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.on_batch, self.on_depth = on_batch, on_depth
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # submit vs close: nothing is queued after the stop marker
        self._thread = threading.Thread(target=self._work, name="mole-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the worker runs and takes new requests."""
        return self._thread.is_alive() and not self._closed.is_set()

    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    def submit(self, request) -> Job:
        """Queue a request; its result (or the engine's exception) arrives on job.future."""
        job = Job(request)
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the server is shutting down")
            self._queue.put(job)
        self._report_depth()
        return job

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, answer every queued one, then stop the worker."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._queue.put(_STOP)
        self._thread.join(timeout)

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self._queue.qsize())

    def _collect(self) -> tuple[list[Job], bool]:
        """(the next batch, whether the stop marker was seen); blocks for the first request."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _work(self) -> None:
        # submit() puts nothing after the stop marker: answering up to it drains the queue
        stop = False
        while not stop:
            batch, stop = self._collect()
            try:
                self._run(batch)
            except Exception:  # a failing metrics callback, say: log it, keep serving
                log.exception("the engine worker hit an error outside the engine")
                for job in batch:
                    _settle(job.future, RuntimeError("the engine worker failed on this batch"))

    def _run(self, batch: list[Job]) -> None:
        # a caller that stopped waiting (its handler was cancelled) is dropped before any engine work
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self._report_depth()
        if self.on_batch is not None:
            self.on_batch(len(batch))
        start = time.perf_counter()
        for job in batch:
            job.started_at = start
        try:
            outcomes = self._answer(batch)
        except BaseException as exc:  # noqa: BLE001 - the worker must outlive anything the engine raises
            log.exception("the engine worker failed on a batch of %d", len(batch))
            outcomes = [exc] * len(batch)
        for job, outcome in zip(batch, outcomes, strict=True):
            _settle(job.future, outcome)

    def _answer(self, batch: list[Job]) -> list:
        """A result or an exception per job: the batch at once, else (it failed) each job alone,
        so that one bad request fails alone and the others of its batch are still answered."""
        try:
            return self._call([j.request for j in batch])
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.warning(
                "a batch of %d failed (%s: %s); answering its requests one by one",
                len(batch),
                type(exc).__name__,
                exc,
            )
        outcomes = []
        for job in batch:
            try:
                outcomes.extend(self._call([job.request]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _call(self, requests: list) -> list:
        results = self.run_batch(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"the engine answered {len(results)} of {len(requests)} requests")
        return results


def _settle(future: Future, outcome) -> None:
    """Give a job its result or exception, unless it is already done (cancelled meanwhile)."""
    if future.done():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled between the check and the set
        pass
