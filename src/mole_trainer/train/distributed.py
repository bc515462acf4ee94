"""Data-parallel training under `torchrun`: process group set-up and the rank helpers.

`torchrun --nproc_per_node N mole train router|experts ...` starts N copies of the command; each
reads its rank from the environment, joins the process group (NCCL on CUDA, gloo on the CPU) and
takes its share of every global batch. Only rank 0 writes files and history rows.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

from ..errors import UserError

# Rank 0 alone scores the experts by generation and saves them while the other ranks wait at the
# next collective: the default 10 minutes is too short for a real base and test set.
GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes checkpoints, logs and history."""
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's rows of a global batch (strided, so every rank gets the same count)."""
        return indices[self.rank :: self.world]


def env_rank() -> int:
    """Rank from torchrun's environment, without importing torch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns the rank info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local), device


def current() -> DistInfo:
    """Rank info of an already initialised process group (rank 0 of 1 otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def all_sum(value: float, info: DistInfo, device) -> float:
    """Sum of a number over all ranks (the number itself when not distributed)."""
    if info.world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()
