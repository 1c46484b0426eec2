"""Data-parallel training on torch.distributed, launched by torchrun.

``codedsmooth train --nproc P …`` re-runs itself under ``torchrun --standalone
--nproc-per-node P``; a run started by torchrun directly works the same way.
Each rank finds its place from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) and joins a process group: gloo on CPU, NCCL on CUDA (one GPU per
rank, by local rank). A single process is world size 1 and needs no group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from codedsmooth.models import resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only one that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def from_environment() -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def join(ranks: Ranks, device: str | None) -> torch.device:
    """Join the process group (when there is more than one rank) and pick this rank's device."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))
    if ranks.distributed and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def leave(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def sum_over_ranks(ranks: Ranks, values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (epoch statistics)."""
    if not ranks.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``codedsmooth <argv>`` on ``nproc`` local processes under torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "codedsmooth.cli", *argv]
    return subprocess.call(cmd)
