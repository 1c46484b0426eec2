"""Coded-smoothing: a target block wrapped with a spline code and its coded loss.

Training loss = task loss + mu · (batch mean of the squared L2 gap between the decoded outputs of
the block on N coded samples and the block's outputs on the true inputs. The gap
is zero only where the block is affine along the spline's interpolation path,
so the term pushes the block towards smoothness across the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .spec import DEFAULT_CODED_POINTS, DEFAULT_DATA_POINTS, coded_points_for, default_n_end
from .spline import SplineCode

MIN_CODED_BATCH = 4


@dataclass(frozen=True)
class NSchedule:
    """Number of coded points N per epoch: a linear ramp from ``n_start`` to ``n_end``.

    Linear in epochs, rounded, one N per epoch: early epochs use N ≈ K, where the
    spline round trip is inexact and the penalty is strongest; later epochs raise
    N towards 1.5K, where decoding is near exact and the penalty measures the
    block's own curvature. A fixed N per epoch keeps the cached code matrices hot.
    """

    n_start: int
    n_end: int
    epochs: int

    def __call__(self, epoch: int) -> int:
        if self.epochs <= 1:
            return self.n_end
        frac = min(max(epoch, 0), self.epochs - 1) / (self.epochs - 1)
        return int(round(self.n_start + frac * (self.n_end - self.n_start)))

    @staticmethod
    def default(k: int, epochs: int) -> NSchedule:
        return NSchedule(n_start=k, n_end=default_n_end(k), epochs=epochs)


class CodedSmoothing(nn.Module):
    """Wraps ``block``; in training returns (output, coded_loss), in eval just the output.

    ``n`` is the number of coded points for a full batch of ``k`` items; shorter
    batches keep the ratio N/K (``core.spec.coded_points_for``). Batches of fewer
    than 4 items are not coded (the coded loss is 0 and ``last_skip_reason`` says
    why): a cubic spline through 2–3 points is at most a quadratic and the
    penalty would be meaningless.
    """

    def __init__(
        self,
        block: nn.Module,
        k: int,
        n: int | None = None,
        mu: float = 1.0,
        data_kind: str = DEFAULT_DATA_POINTS,
        coded_kind: str = DEFAULT_CODED_POINTS,
    ):
        super().__init__()
        self.block = block
        self.k = int(k)
        self.n = int(n) if n is not None else self.k
        self.mu = float(mu)
        self.data_kind, self.coded_kind = data_kind, coded_kind
        self.last_skip_reason: str | None = None

    def set_coded_points(self, n: int) -> None:
        self.n = int(n)

    def coded_loss(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        if batch < MIN_CODED_BATCH:
            self.last_skip_reason = f"batch of {batch} < {MIN_CODED_BATCH} items: coding skipped"
            return out.new_zeros(())
        self.last_skip_reason = None
        n = coded_points_for(batch, self.k, self.n, self.coded_kind)
        code = SplineCode(
            batch, n, device=z.device, dtype=z.dtype, data_kind=self.data_kind, coded_kind=self.coded_kind
        )
        decoded = code.decode(self.block(code.encode(z)))
        return (decoded - out).pow(2).flatten(1).sum(1).mean()

    def forward(self, z: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out: torch.Tensor = self.block(z)
        if not self.training:
            return out
        return out, self.mu * self.coded_loss(z, out)
