"""What an attacker differentiates through, and what it queries.

``RCIModel`` is the server's computation for one-item requests, in torch and
differentiable: each item is coded in its own group with K-1 companions, which
are trusted filler in ``request`` scope and other clients' clean items in
``batch`` scope (an attacker controls only its own items). Targets answer
probabilities for items sent as one-item requests, in-process or over HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from codedsmooth.core import SplineCode, rci_forward_with_companions
from codedsmooth.models import Checkpoint
from codedsmooth.service.client import CodedSmoothClient


@dataclass(frozen=True)
class CodingSpec:
    enabled: bool = True
    scope: str = "request"
    k: int = 32
    n: int = 48

    @staticmethod
    def for_checkpoint(ck: Checkpoint, enabled=True, scope="request", k=None, n=None) -> "CodingSpec":
        k = k or int(ck.config["coding"]["k"])
        return CodingSpec(enabled, scope, k, n or math.ceil(1.5 * k))

    @staticmethod
    def from_server(info: dict) -> "CodingSpec":
        rci = info["rci"]
        return CodingSpec(rci["enabled"], rci["scope"], rci["group_size"], rci["coded_points"])

    def label(self) -> str:
        return f"rci {self.scope} K={self.k} N={self.n}" if self.enabled else "no rci"


class RCIModel:
    """Logits of one-item requests under RCI (or the plain model), differentiable in ``x``.

    ``permute=False`` and ``fixed_companions=True`` remove all randomness: the
    sanity-check model on which an adaptive attack must succeed.
    """

    def __init__(self, ck: Checkpoint, spec: CodingSpec, clean_pool: torch.Tensor | None = None, seed: int = 0, permute: bool = True, fixed_companions: bool = False):
        self.model = ck.model.eval()
        self.spec = spec
        self.permute = permute
        self.fixed_companions = fixed_companions
        self.generator = torch.Generator().manual_seed(seed)
        self.trunk, self.block = self.model.split(ck.target_block)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if spec.enabled:
            self.code = SplineCode(spec.k, spec.n)
            pool = ck.filler if spec.scope == "request" or clean_pool is None else clean_pool
            with torch.no_grad():
                self.pool_z = self.trunk(pool.float())
            self._fixed = self._draw(1)[0]

    def _draw(self, m: int) -> torch.Tensor:
        """(m, K-1) companion indices, distinct within a group when the pool allows."""
        pool, need = self.pool_z.shape[0], self.spec.k - 1
        if pool >= need:
            return torch.rand(m, pool, generator=self.generator).argsort(1)[:, :need]
        return torch.randint(0, pool, (m, need), generator=self.generator)

    def companions(self, m: int) -> torch.Tensor:
        idx = self._fixed.expand(m, -1) if self.fixed_companions else self._draw(m)
        return self.pool_z[idx]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.enabled:
            return self.model(x)
        z = self.trunk(x)
        return rci_forward_with_companions(self.block, z, self.companions(len(x)), self.code, self.generator, self.permute)


class InProcessTarget:
    """Queries answered by an ``RCIModel`` in this process (fresh randomness per query)."""

    def __init__(self, model: RCIModel, batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.queries = 0

    @property
    def spec(self) -> CodingSpec:
        return self.model.spec

    @property
    def name(self) -> str:
        return f"in-process ({self.spec.label()})"

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        parts = [torch.softmax(self.model(x[i : i + self.batch_size]), 1) for i in range(0, len(x), self.batch_size)]
        return torch.cat(parts)


class HttpTarget:
    """Queries sent to a running server, one request per item, concurrently."""

    def __init__(self, url: str, concurrency: int = 32):
        self.client = CodedSmoothClient(url, concurrency=concurrency)
        self.info = self.client.models()[0]
        self.spec = CodingSpec.from_server(self.info)
        self.queries = 0

    @property
    def name(self) -> str:
        return f"{self.client.url} ({self.spec.label()})"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        return torch.from_numpy(self.client.predict_each(x.detach().cpu().numpy().astype(np.float32)))


def accuracy(target, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((target.predict_proba(x).argmax(1) == y).float().mean())
