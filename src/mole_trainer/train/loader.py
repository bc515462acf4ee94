"""Batches for the training loop from a torch DataLoader: collated ahead by worker processes.

The main process draws the index batches from the seeded BatchStream (so the order is the
stream's, whatever the number of workers); the workers gather and pad the rows; batches arrive in
order, pinned in page-locked memory on CUDA so the copy to the GPU overlaps compute. Prefetching
runs the stream ahead of training, so the loader keeps the stream's state after each batch it hands
out: the state a checkpoint records is the one after the last batch trained on, and a resume
continues exactly there.
"""

from __future__ import annotations

import os
from collections import deque

from ..data.preprocess import IGNORE_INDEX, collate

CUDA_WORKERS = 4  # loading processes when data_workers is auto and the device is CUDA


def worker_count(setting: int | None, device_type: str) -> int:
    """Loading processes for a `data_workers` setting (None = auto: CUDA_WORKERS on CUDA, 0 on the CPU)."""
    if setting is not None:
        return setting
    return min(CUDA_WORKERS, max(1, (os.cpu_count() or 2) - 1)) if device_type == "cuda" else 0


class BatchFetcher:
    """What a loading process does with one global batch of indices: this rank's rows, padded.

    Picklable (no lambdas), so it works under any multiprocessing start method.
    """

    def __init__(self, examples, pad_id: int, rank: int = 0, world: int = 1):
        self.examples, self.pad_id, self.rank, self.world = examples, pad_id, rank, world

    def __getitem__(self, idx: list[int]) -> dict:
        batch = collate([self.examples[i] for i in idx[self.rank :: self.world]], self.pad_id)
        # counted on the host here, so the loop never waits on the GPU for it
        batch["supervised"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["rows"] = len(idx)
        return batch


def _as_is(batch):
    return batch


class StreamSampler:
    """A BatchStream as the DataLoader's sampler; records the stream state after each batch drawn."""

    def __init__(self, stream):
        self.stream, self.states = stream, deque()

    def __iter__(self):
        while True:
            idx = next(self.stream)
            self.states.append(self.stream.state_dict())
            yield idx


class BatchLoader:
    """Padded batches of `examples` in the stream's order; `state_dict()` is the stream's state after
    the last batch returned by `next()` (not after the batches prefetched beyond it)."""

    def __init__(
        self, examples, stream, pad_id: int, rank: int, world: int, workers: int, prefetch: int, pin: bool
    ):
        import torch
        from torch.utils.data import DataLoader

        self.sampler = StreamSampler(stream)
        self.state = stream.state_dict()
        loader = DataLoader(
            BatchFetcher(examples, pad_id, rank, world),
            sampler=self.sampler,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=prefetch if workers else None,
            pin_memory=pin,
            # the loader's own seed generator: creating it must not draw from the global RNG that
            # dropout uses, or a resumed run would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(0),
        )
        self.iterator = iter(loader)

    def next(self) -> dict:
        """The next batch: tensors, plus "supervised" (loss positions in this rank's rows) and "rows" (global)."""
        batch = next(self.iterator)
        self.state = self.sampler.states.popleft()
        return batch

    def state_dict(self) -> dict:
        """The stream state after the last batch returned."""
        return self.state

    def close(self) -> None:
        """Stop the loading processes."""
        self.iterator = None
