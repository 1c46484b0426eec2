"""The model side of the server: trunk → (RCI over coding groups | plain block) → probabilities.

Called from one worker thread only: every torch call of the server (load,
warm-up, inference) runs on that thread, because CPU kernels slow down by
about 2× once a second thread has run parallel torch work (OpenMP teams per
thread compete for the cores). Results leave as numpy arrays. A device batch holds the items of several
requests; the trunk runs once on all real items, the coded block runs once on
the coded samples of all coding groups.

Coding groups come from ``codedsmooth.core``'s one planner and apply (see
``core.rci``), with the spec resolved once from the checkpoint and the
settings. Every serving-time draw (permutations, filler choices, the batch
shuffle) comes from the OS CSPRNG; ``rci_seed`` replaces it with a seeded
source, fresh for each coding unit (a request, or the batch in batch scope), for tests and reproduction only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from codedsmooth.core import CodingSpec, SeededRandomSource, SystemRandomSource, apply_plan, plan_groups
from codedsmooth.core.randomness import gaussian
from codedsmooth.core.spec import default_n_end
from codedsmooth.models import Checkpoint
from codedsmooth.service.settings import ServeSettings

log = logging.getLogger("codedsmooth.engine")


def resolve_spec(checkpoint: Checkpoint, settings: ServeSettings) -> CodingSpec:
    """The coding spec in force: the checkpoint's trained code plus the operator's overrides."""
    return checkpoint.coding_spec(
        enabled=settings.rci,
        scope=settings.rci_scope,
        k=settings.rci_group_size,
        n=settings.coded_points,
        decode_tolerance=settings.rci_decode_tolerance,
    )


@dataclass
class BatchStats:
    items: int
    groups: int = 0
    filler_share: float = 0.0
    checked_items: int = 0
    label_flips: int = 0
    decode_residual: float | None = None


@dataclass
class BatchResult:
    probabilities: list[np.ndarray]  # one (n_i, classes) float32 array per request
    stats: BatchStats = field(default_factory=lambda: BatchStats(0))


class InferenceEngine:
    def __init__(self, checkpoint: Checkpoint, settings: ServeSettings, device: torch.device):
        self.checkpoint = checkpoint
        self.settings = settings
        self.device = device
        self.model = checkpoint.model.to(device).eval()
        self.trunk, self.block = checkpoint.coded_split()
        self.spec = resolve_spec(checkpoint, settings)
        self.code = self.spec.code(device=device, dtype=torch.float32)
        with torch.inference_mode():
            self.filler_z = self.trunk(checkpoint.filler.to(device))
        self.noise_sigma = float(settings.input_noise_sigma)
        if settings.rci_seed is not None and (self.spec.enabled or self.noise_sigma > 0):
            log.warning(
                "rci_seed is set: RCI draws and input noise are reproducible, so clients can predict them; for tests and reproduction only"
            )
        exact_n = default_n_end(self.spec.k)
        if self.spec.enabled and self.spec.scope == "batch" and self.spec.n < exact_n:
            log.warning(
                "RCI in batch scope with N = %d coded points, below 1.5 K = %d: the decode is inexact, so other clients' items in a "
                "micro-batch change a request's labels; use --coded-points %d or more, or --rci-scope request",
                self.spec.n,
                exact_n,
                exact_n,
            )
        self._check_rng = random.Random()  # which batches are also run uncoded: a statistic, not a secret

    @property
    def rci_enabled(self) -> bool:
        return self.spec.enabled

    @property
    def scope(self) -> str:
        return self.spec.scope

    def random_source(self):
        """OS CSPRNG unless a seed is set; a seeded source starts afresh for each coding unit."""
        if self.settings.rci_seed is not None:
            return SeededRandomSource(self.settings.rci_seed, per_unit=True)
        return SystemRandomSource()

    def _rci_logits(self, z: torch.Tensor, sizes: list[int], stats: BatchStats) -> torch.Tensor:
        plan = plan_groups(sizes, self.spec.scope, self.spec.k, self.filler_z.shape[0], self.random_source())
        stats.groups = plan.groups
        stats.filler_share = plan.filler_share
        return apply_plan(self.block, z, self.filler_z, plan, self.code, self.spec.decode_tolerance)

    def _with_noise(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The noise baseline: each request's items plus fresh N(0, sigma^2) per pixel (a seeded source restarts per request)."""
        source = self.random_source()
        return [x + self.noise_sigma * gaussian(source.unit(), *x.shape) for x in inputs]

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor]) -> BatchResult:
        """Probabilities for each request's inputs ((n_i, *input_shape) float tensors in [0, 1])."""
        sizes = [int(x.shape[0]) for x in inputs]
        if self.noise_sigma > 0:
            inputs = self._with_noise(inputs)
        x = torch.cat(inputs).to(self.device, non_blocking=True)
        stats = BatchStats(items=x.shape[0])
        z = self.trunk(x)
        if self.rci_enabled:
            logits = self._rci_logits(z, sizes, stats)
            if self.settings.rci_check_rate > 0 and self._check_rng.random() < self.settings.rci_check_rate:
                plain = self.block(z)
                stats.checked_items = x.shape[0]
                stats.label_flips = int((plain.argmax(1) != logits.argmax(1)).sum())
                stats.decode_residual = float((plain - logits).pow(2).sum(1).mean())
        else:
            logits = self.block(z)
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return BatchResult(np.split(probs, np.cumsum(sizes)[:-1]), stats)

    def warm_up(self, max_batch: int) -> None:
        """Run the shapes the server will see so the first request pays no start-up cost."""
        shape = self.checkpoint.input_shape
        for n in sorted({1, max_batch}):
            self.run([torch.zeros(n, *shape)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
