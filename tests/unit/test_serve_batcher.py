"""The micro-batcher: batches fill up to max_batch within max_wait, a failed batch is answered one by one,
cancelled callers are skipped, close drains."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mole_trainer.serve.batcher import MicroBatcher


class Recorder:
    """run_batch that answers each request with (request, batch number) and records the batches."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, requests):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(requests))
        if self.fail_on in requests:
            raise ValueError(f"bad request {self.fail_on}")
        return [(r, len(self.batches)) for r in requests]


def test_requests_within_the_wait_share_a_batch_up_to_max_batch():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, max_wait_s=5.0)
    jobs = [b.submit(i) for i in range(6)]
    # the first four fill a batch at once, without waiting the 5 s out
    assert [j.future.result(timeout=4) for j in jobs[:4]] == [(i, 1) for i in range(4)]
    b.close(timeout=10)  # the other two are answered on close, not dropped
    assert [j.future.result(timeout=1) for j in jobs[4:]] == [(4, 2), (5, 2)]
    assert [len(x) for x in rec.batches] == [4, 2]
    assert rec.threads == {"mole-engine"}  # one worker thread ran the engine
    assert all(j.started_at >= j.queued_at for j in jobs)


def test_a_lone_request_waits_at_most_max_wait():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_s=0.05)
    start = time.perf_counter()
    assert b.submit("a").future.result(timeout=5) == ("a", 1)
    assert time.perf_counter() - start < 2
    b.close(timeout=5)


def test_a_failed_batch_is_answered_one_by_one_and_only_the_culprit_fails():
    rec = Recorder(fail_on="bad")
    b = MicroBatcher(rec, max_batch=3, max_wait_s=5.0)
    jobs = [b.submit("ok"), b.submit("bad"), b.submit("fine")]
    assert jobs[0].future.result(timeout=5) == ("ok", 2)
    with pytest.raises(ValueError, match="bad request bad"):
        jobs[1].future.result(timeout=5)
    assert jobs[2].future.result(timeout=5) == ("fine", 4)
    assert rec.batches == [["ok", "bad", "fine"], ["ok"], ["bad"], ["fine"]]
    assert b.alive
    later = b.submit("x")
    b.close(timeout=5)  # answered at close, without waiting out max_wait
    assert later.future.result(timeout=1) == ("x", 5)


class Gate(Recorder):
    """A Recorder whose first batch waits until released (to cancel jobs while a batch runs)."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, requests):
        if not self.batches:
            self.entered.set()
            self.release.wait(5)
        return super().__call__(requests)


def test_a_job_cancelled_while_queued_never_reaches_the_engine():
    gate = Gate()
    b = MicroBatcher(gate, max_batch=2, max_wait_s=0.0)
    first = b.submit("first")
    assert gate.entered.wait(5)  # the worker holds "first"'s batch
    queued = [b.submit("gone"), b.submit("kept")]
    assert queued[0].future.cancel()  # a handler gave up while its job was still queued
    gate.release.set()
    assert first.future.result(timeout=5) == ("first", 1)
    assert queued[1].future.result(timeout=5) == ("kept", 2)
    assert gate.batches == [["first"], ["kept"]]
    b.close(timeout=5)


def test_a_handler_cancelled_during_its_batch_leaves_the_worker_and_the_batch_answering():
    """The server awaits asyncio.wrap_future(job.future), which cancels the job's future when the
    handler is cancelled (graceful-shutdown timeout, client gone); the worker must go on."""
    gate = Gate()
    b = MicroBatcher(gate, max_batch=2, max_wait_s=1.0)
    jobs = [b.submit("a"), b.submit("b")]

    async def cancel_a_waiter():
        waiter = asyncio.ensure_future(asyncio.wrap_future(jobs[0].future))
        await asyncio.sleep(0)
        assert gate.entered.wait(5)  # the batch of a and b is in the engine
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(cancel_a_waiter())
    gate.release.set()
    assert jobs[1].future.result(timeout=5) == ("b", 1)
    assert b.alive
    later = b.submit("c")
    b.close(timeout=5)
    assert later.future.result(timeout=1) == ("c", 2)


def test_close_refuses_new_work_and_reports_depth():
    depths, sizes = [], []
    b = MicroBatcher(Recorder(), max_batch=3, max_wait_s=0.0, on_batch=sizes.append, on_depth=depths.append)
    b.submit(1).future.result(timeout=5)
    b.close(timeout=5)
    assert not b.alive and sizes == [1]
    # submit reports the queue after its put (0 or 1: the worker may have taken the job already), the
    # worker again once the batch is taken (0)
    assert len(depths) == 2 and 0 in depths and set(depths) <= {0, 1}
    with pytest.raises(RuntimeError, match="shutting down"):
        b.submit(2)
