"""Where RCI's random draws come from: the operating system's CSPRNG, or a seed for reproduction.

Every draw of the coding planner is a sort of independent 64-bit keys (a
permutation is the argsort of K keys; a filler choice the first picks of the
argsort of one key per pool item), so one source interface serves both:
- ``SystemRandomSource`` reads the keys from ``os.urandom``: nothing a client
  can observe or guess predicts them, and there is no seed to recover;
- ``SeededRandomSource`` derives them from a seed with numpy's PCG64 (the whole
  integer seed counts, not 32 bits of it): for tests, attackers' simulations and
  reproduction, never for serving unless the operator asks.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch


class RandomSource(Protocol):
    def keys(self, *shape: int) -> torch.Tensor:
        """Independent uniform 64-bit integer keys of ``shape`` (int64, on the CPU)."""

    def unit(self) -> RandomSource:
        """The source for one coding unit (a request in request scope, the micro-batch in batch scope)."""


def _as_keys(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(raw.view(np.int64).reshape(shape).copy())


class SystemRandomSource:
    """Keys from the OS CSPRNG (``os.urandom``), 64 bits each."""

    seeded = False

    def keys(self, *shape: int) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        return _as_keys(np.frombuffer(os.urandom(8 * count), dtype=np.uint64), shape)

    def unit(self) -> SystemRandomSource:
        return self


class SeededRandomSource:
    """Reproducible keys from a seed (PCG64 over the full integer seed).

    ``per_unit=True`` restarts from the seed for every coding unit, so a request's
    draws do not depend on what else shares its batch (the server's seeded mode);
    otherwise one stream runs through all units (simulations).
    """

    seeded = True

    def __init__(self, seed: int, per_unit: bool = False):
        self.seed = int(seed)
        self.per_unit = per_unit
        self._rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(abs(self.seed), spawn_key=(int(self.seed < 0),)))
        )

    def keys(self, *shape: int) -> torch.Tensor:
        return _as_keys(self._rng.integers(0, 2**64, size=shape, dtype=np.uint64, endpoint=False), shape)

    def unit(self) -> SeededRandomSource:
        return SeededRandomSource(self.seed) if self.per_unit else self


def permutations(source: RandomSource, rows: int, k: int) -> torch.Tensor:
    """(rows, k) independent uniform permutations."""
    return source.keys(rows, k).argsort(dim=1, stable=True)


def choices(source: RandomSource, rows: int, pool: int, count: int) -> torch.Tensor:
    """(rows, count) picks from range(pool): distinct within a row when ``count <= pool``, else uniform with repeats."""
    if count <= pool:
        return source.keys(rows, pool).argsort(dim=1, stable=True)[:, :count]
    return source.keys(rows, count).remainder(pool)


def uniforms(source: RandomSource, *shape: int) -> torch.Tensor:
    """Uniform float64 draws in (0, 1] of ``shape``: the top 53 bits of each key, plus one ulp."""
    bits = (source.keys(*shape) >> 11) & ((1 << 53) - 1)  # arithmetic shift, then mask: the key's top 53 bits
    return (bits.to(torch.float64) + 1.0) / float(1 << 53)


def gaussian(source: RandomSource, *shape: int) -> torch.Tensor:
    """Standard normal float32 draws of ``shape`` (Box–Muller on ``uniforms``; both outputs of a pair used)."""
    count = int(np.prod(shape)) if shape else 1
    u = uniforms(source, 2, (count + 1) // 2)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    angle = 2.0 * torch.pi * u[1]
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
    return normal.to(torch.float32).reshape(shape)
