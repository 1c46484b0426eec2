"""Attacks against real servers over HTTP: the adaptive query attack, the transfer attack's queries, and
the servers they run against (plain, RCI in request scope, and the input-noise baseline).

The targets are the models of one ``codedsmooth serve --model-repository`` on a local port: each
method's model once per setting, named ``<method>-<setting>``, its setting in its ``serving.json``
(:func:`repository_server`). The attacker reaches them only through HTTP.
Results are scored like every other number of the report: in-process, on draws of the served
function with the evaluator's own randomness (:func:`.suite.served_model`).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.models import Checkpoint
from codedsmooth.service.launcher import local_server

from .suite import served_model
from .targets import HttpTarget, RCIModel

# The servers every black-box attack of the report runs against, in table order.
BLACKBOX_SERVERS = {"plain": "plain", "request": "RCI, request scope", "noise": "input noise"}
ITEMS_PER_REQUEST = 128  # plain and noise servers answer items independently: a step's candidates go in few requests


# One torch thread: a one-item request is far too small to split, and on a busy machine idle intra-op
# threads spin (on 2 loaded cores, 2 threads cost about 8× the server CPU time per query of 1 thread).
SERVER_OPTIONS = {"timeout_ms": 120000, "threads": 1}


def model_settings(setting: str, sigma: float) -> dict:
    """The serving settings (a repository model's ``serving.json``, or ``serve`` options) of one black-box setting."""
    if setting not in BLACKBOX_SERVERS:
        raise ValueError(f"unknown server setting {setting!r}; known: {list(BLACKBOX_SERVERS)}")
    options = {"rci": setting == "request", "rci_scope": "request", "max_queue_size": 4096, "max_delay_ms": 2}
    if setting == "noise":
        options["input_noise_sigma"] = sigma
    if setting != "request":
        options["max_batch_size"] = options["max_items_per_request"] = ITEMS_PER_REQUEST
    return options


def serve_options(setting: str, sigma: float) -> dict:
    """``codedsmooth serve`` options of a server of one checkpoint in one black-box setting."""
    return {**model_settings(setting, sigma), **SERVER_OPTIONS}


def target_name(method: str, setting: str) -> str:
    return f"{method}-{setting}"


def served_function(ck: Checkpoint, setting: str, sigma: float, pool: torch.Tensor, seed: int) -> RCIModel:
    """What a server of this setting computes, with the evaluator's randomness (for scoring)."""
    spec = ck.coding_spec(scope="request") if setting == "request" else CodingSpec.plain()
    return served_model(ck, spec, pool, seed, noise_sigma=sigma if setting == "noise" else 0.0)


@contextmanager
def repository_server(targets: dict[str, tuple[Checkpoint, str, float]]):
    """One running server of a repository holding each ``name: (checkpoint, setting, σ)`` as a model of that
    name (links to the checkpoint's files and a ``serving.json``), and ``target(name)``, the attacker's HTTP
    target of that model (opened once)."""
    with tempfile.TemporaryDirectory(prefix="codedsmooth-blackbox-") as tmp:
        root = Path(tmp)
        for name, (ck, setting, sigma) in targets.items():
            folder = root / name
            folder.mkdir()
            for f in Path(ck.path).iterdir():
                if f.is_file():
                    (folder / f.name).symlink_to(f.resolve())
            (folder / "serving.json").write_text(json.dumps(model_settings(setting, sigma)))
        live: dict[str, HttpTarget] = {}
        # the models are links to the checkpoints' own files: a repository this process made, so links out are allowed
        repository = {"model_repository": str(root), "allow_external_symlinks": True}
        with local_server(None, capture_output=True, **repository, **SERVER_OPTIONS) as server:

            def target(name: str) -> HttpTarget:
                if name not in live:
                    _, setting, _ = targets[name]
                    live[name] = HttpTarget(
                        server.url, items_per_request=1 if setting == "request" else ITEMS_PER_REQUEST, model=name
                    )
                    if live[name].spec.enabled != (setting == "request"):
                        raise ValueError(
                            f"{name}: the server reports RCI {'on' if live[name].spec.enabled else 'off'}, expected the {setting} setting"
                        )
                return live[name]

            try:
                yield target
            finally:
                for t in live.values():
                    t.close()


def query_attack(
    target, x: torch.Tensor, y: torch.Tensor, eps: float, budget: int, score_queries: int, confirm: int, seed: int
) -> dict:
    """The adaptive Square (robust statistic over ``score_queries`` queries per candidate, re-queried
    incumbent, breaks confirmed by ``confirm`` fresh queries, every query counted) within ``budget``
    queries per image. Returns the adversarial inputs, the queries each image used and whether its
    break was confirmed, and the wall time."""
    from .square import adaptive_square_attack

    before, started = target.queries, time.monotonic()
    res = adaptive_square_attack(
        target.predict_proba,
        x,
        y,
        eps,
        budget,
        score_queries=score_queries,
        confirm=confirm,
        generator=torch.Generator().manual_seed(seed),
    )
    return {
        "x_adv": res.x_adv.detach().clone(),
        "queries": res.queries.long().clone(),
        "broken": res.broken.bool().clone(),
        "queries_sent": target.queries - before,
        "seconds": time.monotonic() - started,
    }


def one_query(target, x_adv: torch.Tensor, y: torch.Tensor) -> dict:
    """The transfer attack's single query per image: what the server answered."""
    started = time.monotonic()
    answers = target.predict_proba(x_adv).argmax(1)
    return {
        "served_correct": (answers == y).clone(),
        "queries": torch.ones(len(y), dtype=torch.long),
        "seconds": time.monotonic() - started,
    }
