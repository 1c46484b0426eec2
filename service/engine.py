"""The model side of the server: trunk → (RCI over coding groups | plain block) → probabilities.

Called from one worker thread only: every torch call of the server (load,
warm-up, inference) runs on that thread, because CPU kernels slow down by
about 2× once a second thread has run parallel torch work (OpenMP teams per
thread compete for the cores). Results leave as numpy arrays. A device batch holds the items of several
requests; the trunk runs once on all real items, the coded block runs once on
the coded samples of all coding groups.

Coding groups:
- ``request`` scope: each request's items are grouped only with themselves and
  trusted filler (clean inputs stored in the checkpoint, whose trunk outputs are
  computed once at load), padded to K; so no client's input reaches another
  client's output.
- ``batch`` scope (the paper): the whole micro-batch is shuffled and chunked
  into groups of K, the last one padded with filler.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from codedsmooth.core import SplineCode, random_permutations, rci_forward_groups
from codedsmooth.models import Checkpoint

from .settings import ServeSettings


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
        self.trunk, self.block = self.model.split(checkpoint.target_block)
        self.k = settings.group_size(int(checkpoint.config["coding"]["k"]))
        self.n = settings.coded_points_for(self.k)
        self.code = SplineCode(self.k, self.n, device=device, dtype=torch.float32)
        with torch.inference_mode():
            self.filler_z = self.trunk(checkpoint.filler.to(device))
        seed = settings.rci_seed if settings.rci_seed is not None else int.from_bytes(os.urandom(8), "little")
        self._master = torch.Generator().manual_seed(seed)
        self._check_rng = random.Random()

    @property
    def rci_enabled(self) -> bool:
        return self.settings.rci

    @property
    def scope(self) -> str:
        return self.settings.rci_scope

    def _generator(self) -> torch.Generator:
        """A generator for one coding unit (a request, or a batch in batch scope)."""
        if self.settings.rci_seed is not None:
            return torch.Generator().manual_seed(self.settings.rci_seed)
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._master)))

    def _filler_indices(self, count: int, gen: torch.Generator) -> torch.Tensor:
        pool = self.filler_z.shape[0]
        if count <= pool:
            return torch.randperm(pool, generator=gen)[:count]
        return torch.randint(0, pool, (count,), generator=gen)

    def _groups(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Index rows (G, K) into [real items | filler] (filler offset by the real count) and perms (G, K)."""
        total = sum(sizes)
        k = self.k
        rows, perms = [], []
        if self.scope == "request":
            start = 0
            for size in sizes:
                gen = self._generator()
                items = torch.arange(start, start + size)
                start += size
                for g in range(math.ceil(size / k)):
                    chunk = items[g * k : (g + 1) * k]
                    fill = self._filler_indices(k - len(chunk), gen) + total
                    rows.append(torch.cat([chunk, fill]))
                    perms.append(random_permutations(1, k, gen)[0])
        else:
            gen = self._generator()
            shuffled = torch.randperm(total, generator=gen)
            groups = math.ceil(total / k)
            fill = self._filler_indices(groups * k - total, gen) + total
            flat = torch.cat([shuffled, fill])
            rows = list(flat.view(groups, k))
            perms = list(random_permutations(groups, k, gen))
        return torch.stack(rows), torch.stack(perms)

    def _rci_logits(self, z: torch.Tensor, sizes: list[int], stats: BatchStats) -> torch.Tensor:
        total = z.shape[0]
        index, perms = self._groups(sizes)
        flat = index.reshape(-1).to(self.device)
        is_real = flat < total
        grouped = torch.empty((flat.numel(), *z.shape[1:]), device=z.device, dtype=z.dtype)
        grouped[is_real] = z[flat[is_real]]
        grouped[~is_real] = self.filler_z[flat[~is_real] - total]
        decoded = rci_forward_groups(self.block, grouped.view(index.shape[0], self.k, *z.shape[1:]), self.code, perms)
        decoded = decoded.reshape(flat.numel(), -1)
        logits = torch.empty((total, decoded.shape[1]), device=z.device, dtype=decoded.dtype)
        logits[flat[is_real]] = decoded[is_real]
        stats.groups = index.shape[0]
        stats.filler_share = float((~is_real).sum()) / flat.numel()
        return logits

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor]) -> BatchResult:
        """Probabilities for each request's inputs ((n_i, *input_shape) float tensors in [0, 1])."""
        sizes = [int(x.shape[0]) for x in inputs]
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
