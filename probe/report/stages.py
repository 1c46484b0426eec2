"""The report's stages on one model, one function each (training is in :mod:`.training`; the cascades without
and through RCI in :mod:`..suite`): the ε-curve's extra points; the
transfer attack's surrogate adversarials; the noise baseline's σ; the EOT convergence curve, the N
sweep, the co-tenant probe and the shipped checkpoint's accuracy. Each returns data that
:mod:`.report` caches per stage (:mod:`.cache`) and turns into the results file.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import apgd
from codedsmooth.models import Checkpoint, default_checkpoint_path, load_checkpoint

from ..attacks import AttackConfig
from ..cotenant import cotenant_report
from ..stats import wilson
from ..suite import (
    Outcome,
    Scorer,
    SuiteConfig,
    attacker_and_scorer,
    eot_attacks,
    run_cascade,
    served_model,
    transfer_attack,
    whitebox_attacks,
)
from ..targets import InProcessTarget, RCIModel
from .config import ReportConfig

log = logging.getLogger("codedsmooth.report")


class Clock:
    """Seconds spent per stage, for the report's run-time table."""

    def __init__(self):
        self.start = time.monotonic()
        self.stages: dict[str, float] = {}

    def add(self, stage: str, since: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.monotonic() - since

    @property
    def total(self) -> float:
        return time.monotonic() - self.start


def outcome_data(out: Outcome) -> dict:
    """An outcome as plain data (for the stage cache)."""
    return {"x_adv": out.x_adv, "correct": out.correct, "log": [[n, float(a)] for n, a in out.log]}


def outcome_from(data: dict) -> Outcome:
    return Outcome(data["x_adv"].clone(), data["correct"].clone(), [(n, float(a)) for n, a in data["log"]])


def summary(out: Outcome) -> dict:
    """What the tables need of one outcome. The interval is Wilson's for the (expected) count of correct
    images; per-image scores of a randomized model lie in [0, 1] and vary less than a coin, so for
    expected accuracy the interval is conservative."""
    n = int(out.correct.shape[1])
    ci = wilson(int(round(out.accuracy * n)), n)
    return {
        "accuracy": out.accuracy,
        "interval": [ci.low, ci.high],
        "n": n,
        "draws": int(out.correct.shape[0]),
        "draw_sd": out.draw_sd,
        "majority_accuracy": float(out.majority().float().mean()),
        "cascade": [[name, acc] for name, acc in out.log],
        "score": [round(float(s), 4) for s in out.score],
    }


def curve_stage(
    cfg: ReportConfig, suite: SuiteConfig, ck: Checkpoint, x, y, plain: dict[str, Outcome]
) -> dict[str, Outcome]:
    """The plain ε-curve's extra points: above the table's radii from its largest ε's worst case, below it from the clean images."""
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), None, 1, suite.seed)
    current = plain[f"{cfg.eps[-1]:g}"]
    curve = {}
    for eps in sorted(e for e in cfg.curve_eps if e > cfg.eps[-1]):
        current = run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, current)
        curve[f"{eps:g}"] = current
    for eps in sorted(e for e in cfg.curve_eps if e < cfg.eps[0]):
        curve[f"{eps:g}"] = run_cascade(
            whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, plain_scorer.start(x, y)
        )
    return curve


def transfer_source(suite: SuiteConfig, surrogate: Checkpoint, x, y, eps: float) -> torch.Tensor:
    """White-box APGD-CE on a surrogate model the attacker trained itself (no queries to the target)."""
    model = RCIModel(surrogate, CodingSpec.plain())
    return apgd(
        model, x, y, eps, steps=suite.apgd_steps, loss="ce", generator=torch.Generator().manual_seed(suite.seed)
    ).detach()


@torch.no_grad()
def noise_calibration(cfg: ReportConfig, ck: Checkpoint, x, y, pool, seed: int) -> dict:
    """The input-noise σ whose clean accuracy (expected over draws) is closest to RCI's (request scope), from a grid."""

    def clean(model):
        return Scorer(model, cfg.calibration_draws).start(x, y).accuracy

    rci = clean(served_model(ck, ck.coding_spec(scope="request"), pool, seed))
    plain = clean(RCIModel(ck, CodingSpec.plain()))
    grid = {f"{s:g}": clean(served_model(ck, CodingSpec.plain(), pool, seed, noise_sigma=s)) for s in cfg.noise_grid}
    sigma = min(grid, key=lambda s: (abs(grid[s] - rci), float(s)))
    return {
        "sigma": float(sigma),
        "noise_clean": grid[sigma],
        "rci_clean": rci,
        "plain_clean": plain,
        "grid": grid,
        "images": len(x),
        "draws": cfg.calibration_draws,
    }


def eot_curve(cfg: ReportConfig, ck: Checkpoint, x, y, pool, eps: float, seed: int) -> list[dict]:
    """EOT-APGD-CE alone through RCI (request scope) at several (draws, steps): accuracy should flatten."""
    attacker, scorer = attacker_and_scorer(ck, ck.coding_spec(scope="request"), pool, cfg.draws, seed)
    rows = []
    for draws, steps in cfg.eot_grid():
        x_adv = apgd(
            attacker, x, y, eps, steps=steps, loss="ce", eot=draws, generator=torch.Generator().manual_seed(seed + 7)
        )
        scored = Outcome(x_adv, scorer(x_adv, y))
        rows.append(
            {
                "draws": draws,
                "steps": steps,
                "gradients": draws * steps,
                "accuracy": scored.accuracy,
                "draw_sd": scored.draw_sd,
            }
        )
    return rows


def n_sweep(cfg: ReportConfig, suite: SuiteConfig, ck: Checkpoint, x, y, pool, plain: Outcome, eps: float) -> dict:
    """Coded model, request scope: clean and worst-case (transfer + EOT-APGD) accuracy at N = K, 1.25K, 1.5K."""
    k = ck.config.coding.k
    rows = {}
    for n in sorted({k, 2 * math.ceil(0.625 * k), 2 * math.ceil(0.75 * k)}):
        attacker, scorer = attacker_and_scorer(ck, ck.coding_spec(scope="request", n=n), pool, cfg.draws, suite.seed)
        start = scorer.start(x, y)
        worst = run_cascade(
            [transfer_attack("transfer", plain), *eot_attacks(attacker, eps, suite)], scorer, x, y, start
        )
        rows[n] = {"clean": start.accuracy, "worst": worst.accuracy, "draw_sd": worst.draw_sd}
    return {"k": k, "eps": eps, "rows": rows}


def cotenant_table(cfg: ReportConfig, ck: Checkpoint, x, y, pool) -> dict:
    """The co-tenant probe on victims ``x`` at N = K and the checkpoint's N, in both scopes."""
    k = ck.config.coding.k
    acfg = AttackConfig(attack="cotenant", steps=cfg.cotenant_steps, eot_samples=4, seed=0)
    out = {}
    for scope, n in (("batch", k), ("batch", ck.coding_spec().n), ("request", k), ("request", ck.coding_spec().n)):
        spec = ck.coding_spec(scope=scope, n=n)
        target_model = RCIModel(ck, spec, pool, seed=100)
        out[f"{scope} N={n}"] = cotenant_report(acfg, ck, spec, InProcessTarget(target_model), x, y, pool)["cotenant"]
    return out


@torch.no_grad()
def plain_predictions(ck: Checkpoint, x, batch_size: int = 256) -> torch.Tensor:
    """Per image, the class the plain model (no RCI) predicts."""
    model = RCIModel(ck, CodingSpec.plain())
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def clean_correct(ck: Checkpoint, x, y) -> torch.Tensor:
    """Per image, whether the plain model (no RCI) classifies it correctly."""
    return plain_predictions(ck, x) == y


def default_checkpoint_accuracy(x, y, pool, draws: int) -> dict:
    """The shipped checkpoint on the whole test split: plain, and served with RCI (expected over draws)."""
    ck = load_checkpoint(default_checkpoint_path())
    plain = Scorer(RCIModel(ck, CodingSpec.plain()), 1).start(x, y)
    rci = Scorer(RCIModel(ck, ck.coding_spec(), pool, seed=3000), draws).start(x, y)
    return {
        "name": ck.name,
        "n": len(x),
        "plain": plain.accuracy,
        "rci": rci.accuracy,
        "rci_draw_sd": rci.draw_sd,
        "draws": int(rci.correct.shape[0]),
    }
