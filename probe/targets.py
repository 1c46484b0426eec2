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

import torch

from codedsmooth.core import CodingPlan, CodingSpec, SeededRandomSource, apply_plan, identity_permutations, plan_groups
from codedsmooth.core.randomness import choices, gaussian
from codedsmooth.models import Checkpoint
from codedsmooth.service.api.schemas import RciInfo
from codedsmooth.service.vocabulary import V2_PROBABILITIES

from .endpoint import Endpoint, EndpointOptions
from .transport import EndpointRefused, HttpTransport, raise_for

MAX_RATE_WAIT_S = 60  # longest Retry-After of a 429 the attack waits out (a longer one: a spent quota, raised at once)
MAX_RETRIES = 20


def spec_from_server(info: dict) -> CodingSpec:
    """The spec a server reports in ``GET /v1/models``."""
    return RciInfo.model_validate(info["rci"]).to_spec()


class RCIModel:
    """Logits of one-item requests under RCI (or the plain model), differentiable in ``x``.

    ``batch_mates``: in batch scope, how many other clients' one-item requests share
    the micro-batch (default K-1: the victim's group is full of strangers).
    ``deterministic=True`` fixes every draw (the same companions for every call, the
    identity permutation): the sanity-check model on which an adaptive attack must succeed.
    ``noise_sigma`` > 0 is the server's noise baseline (``serve --input-noise-sigma``): fresh
    Gaussian noise of that standard deviation added to every pixel before the model, with or
    without RCI, drawn here from the model's own seeded source.
    """

    def __init__(
        self,
        ck: Checkpoint,
        spec: CodingSpec,
        clean_pool: torch.Tensor | None = None,
        seed: int = 0,
        deterministic: bool = False,
        batch_mates: int | None = None,
        noise_sigma: float = 0.0,
    ):
        self.model = ck.model.eval()
        self.spec = spec
        self.noise_sigma = float(noise_sigma)
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
        return (
            CodingPlan(plan.rows, identity_permutations(plan.groups, plan.k), plan.n_items)
            if self.deterministic
            else plan
        )

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
        plans = [
            self._fix(plan_groups([1, *other_sizes], self.spec.scope, self.spec.k, self.filler_z.shape[0], source))
            for _ in range(m)
        ]
        items = torch.cat([torch.cat([z[i : i + 1], others_z[i]]) for i in range(m)])
        out = apply_plan(
            self.block, items, self.filler_z, CodingPlan.concat(plans), self.code, self.spec.decode_tolerance
        )
        return out[:: 1 + b]

    @property
    def randomized(self) -> bool:
        """Whether two calls on the same input can answer differently."""
        return not self.deterministic and (self.spec.enabled or self.noise_sigma > 0)

    def label(self) -> str:
        return self.spec.label() + (f", input noise σ = {self.noise_sigma:g}" if self.noise_sigma > 0 else "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        source = self._source()
        if self.noise_sigma > 0:
            x = x + self.noise_sigma * gaussian(source, *x.shape).to(x.device, x.dtype)
        if not self.spec.enabled:
            return self.model(x)
        z = self.trunk(x)
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
        return f"in-process ({self.model.label()})"

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        parts = [torch.softmax(self.model(x[i : i + self.batch_size]), 1) for i in range(0, len(x), self.batch_size)]
        return torch.cat(parts)


class HttpTarget:
    """Queries sent to a running server of this project: the probe's one HTTP target (``probe.endpoint.Endpoint``,
    which ``audit`` queries too) speaking v2 binary tensors, plus the coding spec the server reports.

    ``items_per_request=1`` (the default) sends each item as its own one-item request, as
    independent clients do; RCI codes a request's items together, so against RCI that is the
    only way to query the served one-item function. A server whose items are answered
    independently (no RCI, with or without input noise) gives the same answers to items sent
    several per request, which is much faster over HTTP. ``api_key`` is sent as
    ``Authorization: Bearer`` (default: env ``CODEDSMOOTH_API_KEY``; see ``probe.transport``).
    ``model``: one model of a repository server (``serve --model-repository``), by name.
    """

    def __init__(
        self,
        url: str,
        concurrency: int = 8,
        items_per_request: int = 1,
        api_key: str | None = None,
        model: str | None = None,
    ):
        transport = HttpTransport(url, api_key=api_key, concurrency=concurrency)
        r = transport.get("/v1/models")
        try:
            raise_for(r, f"{transport.url} did not answer GET /v1/models")
        except EndpointRefused as exc:
            raise ConnectionError(str(exc)) from None
        models = r.json()
        named = [m for m in models if model is None or m["name"] == model]
        if not named:
            raise ValueError(f"{url} serves no model {model!r}; it serves {[m['name'] for m in models]}")
        self.info = named[0]
        self.spec = spec_from_server(self.info)
        if self.spec.enabled and items_per_request != 1:
            raise ValueError("an RCI server codes a request's items together: query it with one-item requests")
        self.items_per_request = items_per_request
        self.endpoint = Endpoint(
            EndpointOptions(
                url=url,
                model=self.info["name"],
                protocol="v2",
                api_key=api_key,
                layout="NCHW",
                output="probabilities",
                output_name=V2_PROBABILITIES,
                concurrency=concurrency,
                retries=MAX_RETRIES,
                max_wait_s=MAX_RATE_WAIT_S,
                binary=True,
                items_per_request=items_per_request,
            )
        )

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def queries(self) -> int:
        return self.endpoint.queries

    @property
    def name(self) -> str:
        return f"{self.url} ({self.spec.label()})"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.endpoint.predict_proba(x)

    def close(self) -> None:
        self.endpoint.close()


def is_randomized(target) -> bool:
    """Whether the target can answer the same input differently: RCI, or input noise (a server does not
    report its noise, so two answers to one input are compared)."""
    if isinstance(target, InProcessTarget):
        return target.model.randomized
    if target.spec.enabled:
        return True
    if not hasattr(target, "_randomized"):
        probe = torch.full((2, *target.info["input_shape"]), 0.5)
        answers = target.predict_proba(probe)
        target._randomized = not torch.equal(answers[0], answers[1])
    return target._randomized


def accuracy(target, x: torch.Tensor, y: torch.Tensor) -> float:
    """One query per item."""
    return float((target.predict_proba(x).argmax(1) == y).float().mean())


def expected_accuracy(target, x: torch.Tensor, y: torch.Tensor, draws: int) -> float:
    """Accuracy expected over ``draws`` queries per item of a randomized target (one query of a deterministic one)."""
    n = draws if is_randomized(target) else 1
    return sum(accuracy(target, x, y) for _ in range(n)) / n
