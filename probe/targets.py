"""What an attacker differentiates through, and what it queries.

``RCIModel`` is the server's function in torch, differentiable: it calls the
same planner and apply as the server's engine (``codedsmooth.core.rci``), with
the coding spec the server reports. In ``request`` scope each attacked image is
a one-item request coded with trusted filler; in ``batch`` scope it is a
one-item request in a micro-batch with other clients' clean one-item requests,
planned exactly as the server plans a micro-batch (an attacker controls only
its own items). Targets answer probabilities for items sent as one-item
requests, in-process or over HTTP.
"""

from __future__ import annotations

import numpy as np
import torch

from codedsmooth.core import CodingPlan, CodingSpec, SeededRandomSource, apply_plan, identity_permutations, plan_groups
from codedsmooth.core.randomness import choices
from codedsmooth.models import Checkpoint
from codedsmooth.service.client import CodedSmoothClient
from codedsmooth.service.schemas import RciInfo


def spec_from_server(info: dict) -> CodingSpec:
    """The spec a server reports in ``GET /v1/models``."""
    return RciInfo.model_validate(info["rci"]).to_spec()


class RCIModel:
    """Logits of one-item requests under RCI (or the plain model), differentiable in ``x``.

    ``batch_mates``: in batch scope, how many other clients' one-item requests share
    the micro-batch (default K-1: the victim's group is full of strangers).
    ``deterministic=True`` fixes every draw (the same companions for every call, the
    identity permutation): the sanity-check model on which an adaptive attack must succeed.
    """

    def __init__(self, ck: Checkpoint, spec: CodingSpec, clean_pool: torch.Tensor | None = None, seed: int = 0, deterministic: bool = False, batch_mates: int | None = None):
        self.model = ck.model.eval()
        self.spec = spec
        self.seed = seed
        self.deterministic = deterministic
        self.source = SeededRandomSource(seed)
        self.trunk, self.block = ck.coded_split()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if spec.enabled:
            self.code = spec.code()
            with torch.no_grad():
                self.filler_z = self.trunk(ck.filler.float())
                self.mates_z = self.trunk(clean_pool.float()) if clean_pool is not None else self.filler_z
            self.batch_mates = spec.k - 1 if batch_mates is None else int(batch_mates)

    def _source(self):
        return SeededRandomSource(self.seed) if self.deterministic else self.source

    def _fix(self, plan: CodingPlan) -> CodingPlan:
        return CodingPlan(plan.rows, identity_permutations(plan.groups, plan.k), plan.n_items) if self.deterministic else plan

    def serve(self, z: torch.Tensor, sizes: list[int], source) -> torch.Tensor:
        """Logits for one micro-batch of requests of ``sizes`` items (trunk outputs ``z``), as the server computes them."""
        plan = self._fix(plan_groups(sizes, self.spec.scope, self.spec.k, self.filler_z.shape[0], source))
        return apply_plan(self.block, z, self.filler_z, plan, self.code, self.spec.decode_tolerance)

    def in_micro_batches(self, z: torch.Tensor, others_z: torch.Tensor, other_sizes: list[int], source) -> torch.Tensor:
        """Logits of M one-item requests, request m in its own micro-batch with requests of ``other_sizes``.

        ``others_z`` (M, sum(other_sizes), ...) are the trunk outputs of each micro-batch's other
        items; every micro-batch is planned as the server plans one, in the spec's scope.
        """
        m, b = others_z.shape[0], others_z.shape[1]
        plans = [self._fix(plan_groups([1, *other_sizes], self.spec.scope, self.spec.k, self.filler_z.shape[0], source)) for _ in range(m)]
        items = torch.cat([torch.cat([z[i : i + 1], others_z[i]]) for i in range(m)])
        out = apply_plan(self.block, items, self.filler_z, CodingPlan.concat(plans), self.code, self.spec.decode_tolerance)
        return out[:: 1 + b]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.enabled:
            return self.model(x)
        z = self.trunk(x)
        source = self._source()
        if self.spec.scope == "request":
            return self.serve(z, [1] * len(x), source)
        picks = choices(source, len(x), self.mates_z.shape[0], self.batch_mates)
        return self.in_micro_batches(z, self.mates_z[picks], [1] * self.batch_mates, source)


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
    """Queries sent to a running server, one request per item, concurrently (v2 binary tensors on kept connections)."""

    def __init__(self, url: str, concurrency: int = 8, api_key: str | None = None):
        """``api_key``: sent as ``Authorization: Bearer`` (default: env ``CODEDSMOOTH_API_KEY``; see ``service.client``)."""
        self.client = CodedSmoothClient(url, concurrency=concurrency, api_key=api_key)
        self.info = self.client.models()[0]
        self.spec = spec_from_server(self.info)
        self.queries = 0

    @property
    def name(self) -> str:
        return f"{self.client.url} ({self.spec.label()})"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        return torch.from_numpy(self.client.predict_each(x.detach().cpu().numpy().astype(np.float32)))

    def close(self) -> None:
        self.client.close()


def accuracy(target, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((target.predict_proba(x).argmax(1) == y).float().mean())
