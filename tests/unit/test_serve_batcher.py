"""The micro-batcher: batches fill up to max_batch within max_wait, failures reach every caller, close drains."""

from __future__ import annotations

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


def test_an_engine_failure_reaches_every_caller_of_the_batch_and_the_worker_goes_on():
    rec = Recorder(fail_on="bad")
    b = MicroBatcher(rec, max_batch=2, max_wait_s=5.0)
    jobs = [b.submit("ok"), b.submit("bad")]
    for j in jobs:
        with pytest.raises(ValueError, match="bad request bad"):
            j.future.result(timeout=5)
    assert b.alive and b.submit("x").future is not None
    b.close(timeout=5)
    assert rec.batches[-1] == ["x"]


def test_close_refuses_new_work_and_reports_depth():
    depths, sizes = [], []
    b = MicroBatcher(Recorder(), max_batch=3, max_wait_s=0.0, on_batch=sizes.append, on_depth=depths.append)
    b.submit(1).future.result(timeout=5)
    b.close(timeout=5)
    assert not b.alive and sizes == [1] and depths[0] >= 0
    with pytest.raises(RuntimeError, match="shutting down"):
        b.submit(2)
