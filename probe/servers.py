"""The report's stage against real servers: Square over HTTP on a plain and an RCI server of a checkpoint."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from codedsmooth.models import Checkpoint
from codedsmooth.service.launcher import local_server

from .suite import attacker_and_scorer, square
from .targets import HttpTarget

if TYPE_CHECKING:
    from .report import ReportConfig


def square_over_http(cfg: ReportConfig, ck: Checkpoint, outcomes, x, y, pool, seed: int) -> dict:
    """Square at the largest ε over HTTP against a plain server and an RCI (request scope) server of this checkpoint.

    Each result is scored like the white-box ones (RCI: on ``draws`` draws of the served function)
    and compared with the white-box worst case on the same images; then merged into the worst case.
    """
    eps = cfg.eps[-1]
    key = f"{eps:g}"
    xs, ys = x[: cfg.square_images], y[: cfg.square_images]
    idx = torch.arange(len(xs))
    out = {"eps": eps, "queries": cfg.square_queries}
    for setting, rci in (("plain", False), ("request", True)):
        spec = ck.coding_spec(enabled=rci, scope="request")
        _, scorer = attacker_and_scorer(ck, spec, pool, cfg.draws, seed)
        with local_server(ck.path, capture_output=False, rci=rci, rci_scope="request", max_queue_size=1024, timeout_ms=120000) as server:
            target = HttpTarget(server.url)
            started = time.monotonic()
            try:
                x_adv = square(target.predict_proba, eps, cfg.square_queries, seed)(xs, ys)
            finally:
                target.close()
            seconds = time.monotonic() - started
        correct = scorer(x_adv, ys)
        whitebox = outcomes[setting][key]
        n = min(len(xs), whitebox.correct.shape[1])
        out[setting] = {
            "server": spec.label(), "images": n, "queries_sent": target.queries, "seconds": seconds,
            "accuracy": float(correct.float().mean(0)[:n].mean()), "whitebox_accuracy": float(whitebox.score[:n].mean()),
        }
        whitebox.merge(idx[:n], x_adv[:n], correct[:, :n])
        whitebox.log.append((f"Square {cfg.square_queries} q, HTTP (first {n})", whitebox.accuracy))
    return out
