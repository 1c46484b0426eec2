"""Data-parallel training on torch.distributed, launched by torchrun.

``codedsmooth train --nproc P …`` re-runs itself under ``torchrun --standalone
--nproc-per-node P``; a run started by torchrun directly works the same way.
Each rank finds its place from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) and joins a process group: gloo on CPU, NCCL on CUDA (one GPU per
rank, by local rank). A single process is world size 1 and needs no group.

On a busy host: each CPU rank uses at most its share of this process's CPUs for torch threads (P
ranks with a thread per core each would oversubscribe the cores P times and stall the collectives),
and ``launch`` starts a run that died after saving a new epoch (a rank killed or aborted) again from
that epoch, with ``--resume``, up to ``MAX_RUNS`` runs in all.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from codedsmooth.models import resolve_device

log = logging.getLogger("codedsmooth.train")

MAX_RUNS = 3  # a run that keeps dying after progress is started at most this often


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
        else:
            torch.set_num_threads(threads_per_rank(torch.get_num_threads()))
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def threads_per_rank(threads: int) -> int:
    """``threads``, capped at this rank's share of the CPUs it may run on (the ranks on this node split them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(threads, cpus // max(1, local_ranks)))


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


def launch(nproc: int, argv: list[str], saved_epoch: Callable[[], int | None] = lambda: None) -> int:
    """Run ``codedsmooth <argv>`` on ``nproc`` local processes under torchrun; returns its exit code.

    ``saved_epoch()``: the last epoch the run has saved to resume from (None: none). A run that
    fails after saving a newer epoch than it started from is started again from it (``--resume``),
    up to ``MAX_RUNS`` runs in all; a run that fails without progress (a wrong setting, a crash at
    start) is not, and its exit code is returned.
    """
    args = list(argv)
    for run in range(1, MAX_RUNS + 1):
        before = saved_epoch()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "codedsmooth.cli",
            *args,
        ]
        code = subprocess.call(cmd)
        after = saved_epoch()
        if code == 0 or run == MAX_RUNS or after is None or after == before:
            return code
        log.warning(
            "a rank failed (exit code %d) after epoch %d was saved; resuming from it (run %d of at most %d)",
            code,
            after,
            run + 1,
            MAX_RUNS,
        )
        if "--resume" not in args:
            args.append("--resume")
    return code
