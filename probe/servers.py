"""Attacks against real servers over HTTP: the adaptive query attack, the transfer attack's queries, and
the servers they run against (plain, RCI in request scope, and the input-noise baseline).

Each server is ``codedsmooth serve`` on a local port; the attacker reaches it only through HTTP.
Results are scored like every other number of the report: in-process, on draws of the served
function with the evaluator's own randomness (:func:`.suite.served_model`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.models import Checkpoint
from codedsmooth.service.launcher import local_server

from .suite import served_model
from .targets import HttpTarget, RCIModel

# The servers every black-box attack of the report runs against, in table order.
BLACKBOX_SERVERS = {"plain": "plain", "request": "RCI, request scope", "noise": "input noise"}
ITEMS_PER_REQUEST = 128  # plain and noise servers answer items independently: a step's candidates go in few requests


def serve_options(setting: str, sigma: float) -> dict:
    """``codedsmooth serve`` options of one black-box setting."""
    if setting not in BLACKBOX_SERVERS:
        raise ValueError(f"unknown server setting {setting!r}; known: {list(BLACKBOX_SERVERS)}")
    # One torch thread: a one-item request is far too small to split, and on a busy machine idle intra-op
    # threads spin (on 2 loaded cores, 2 threads cost about 8× the server CPU time per query of 1 thread).
    options = {"rci": setting == "request", "rci_scope": "request", "max_queue_size": 4096, "timeout_ms": 120000, "max_delay_ms": 2, "threads": 1}
    if setting == "noise":
        options["input_noise_sigma"] = sigma
    if setting != "request":
        options["max_batch_size"] = ITEMS_PER_REQUEST
    return options


def served_function(ck: Checkpoint, setting: str, sigma: float, pool: torch.Tensor, seed: int) -> RCIModel:
    """What a server of this setting computes, with the evaluator's randomness (for scoring)."""
    spec = ck.coding_spec(scope="request") if setting == "request" else CodingSpec.plain()
    return served_model(ck, spec, pool, seed, noise_sigma=sigma if setting == "noise" else 0.0)


@contextmanager
def server_target(ck: Checkpoint, setting: str, sigma: float):
    """A running server of ``ck`` in this setting, and the attacker's HTTP target for it."""
    with local_server(ck.path, capture_output=True, **serve_options(setting, sigma)) as server:
        target = HttpTarget(server.url, items_per_request=1 if setting == "request" else ITEMS_PER_REQUEST)
        try:
            if target.info["name"] != ck.name:
                raise ValueError(f"server serves {target.info['name']!r}, expected {ck.name!r}")
            yield target
        finally:
            target.close()


def query_attack(target, x: torch.Tensor, y: torch.Tensor, eps: float, budget: int, score_queries: int, confirm: int, seed: int) -> dict:
    """The adaptive Square (robust statistic over ``score_queries`` queries per candidate, re-queried
    incumbent, breaks confirmed by ``confirm`` fresh queries, every query counted) within ``budget``
    queries per image. Returns the adversarial inputs, the queries each image used and whether its
    break was confirmed, and the wall time."""
    from .square import adaptive_square_attack

    before, started = target.queries, time.monotonic()
    res = adaptive_square_attack(target.predict_proba, x, y, eps, budget, score_queries=score_queries, confirm=confirm, generator=torch.Generator().manual_seed(seed))
    return {
        "x_adv": res.x_adv.detach().clone(), "queries": res.queries.long().clone(), "broken": res.broken.bool().clone(),
        "queries_sent": target.queries - before, "seconds": time.monotonic() - started,
    }


def one_query(target, x_adv: torch.Tensor, y: torch.Tensor) -> dict:
    """The transfer attack's single query per image: what the server answered."""
    started = time.monotonic()
    answers = target.predict_proba(x_adv).argmax(1)
    return {"served_correct": (answers == y).clone(), "queries": torch.ones(len(y), dtype=torch.long), "seconds": time.monotonic() - started}
