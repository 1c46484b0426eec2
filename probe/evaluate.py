"""Threat models, their evaluation and the built-in sanity checks (Carlini et al. 2019)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import apgd, fgsm, pgd
from codedsmooth.models import Checkpoint

from .checks import LARGE_EPS, check, identity_permutation
from .servers import query_attack
from .suite import SuiteConfig
from .targets import InProcessTarget, RCIModel, expected_accuracy, is_randomized

GRADIENT_ATTACKS = ("fgsm", "pgd", "apgd", "eot-pgd")


ATTACKS = (*GRADIENT_ATTACKS, "square", "cotenant")
THREATS = ("transfer", "adaptive", "blackbox")


@dataclass
class AttackConfig:
    """One attack run; ``codedsmooth attack`` takes its options and defaults from these fields."""

    attack: str = field(default="pgd", metadata={"help": "attack", "choices": ATTACKS})
    threat: str = field(default="adaptive", metadata={
        "help": "transfer: gradients of the model without RCI; adaptive: gradients through RCI (EOT for eot-pgd and fgsm; apgd: the report's RCI cascade); blackbox: queries only",
        "choices": THREATS,
    })
    eps: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "L∞ radius in pixel units [0, 1]; several values for a sweep"})
    steps: int = field(default=20, metadata={"help": "PGD and APGD steps; co-tenant optimisation steps"})
    restarts: int = field(default=1, metadata={"help": "apgd: random restarts of the PGD-CE step of the report's cascade"})
    eot_samples: int = field(default=8, metadata={"help": "RCI draws averaged per gradient in EOT"})
    samples: int = field(default=200, metadata={"help": "test items attacked"})
    queries: int = field(default=1000, metadata={"help": "black-box: query budget per item (every query counts)"})
    score_queries: int = field(default=2, metadata={"help": "black-box: queries per candidate; the attack keeps their maximum margin (robust to one-sided noise)"})
    confirm: int = field(default=4, metadata={"help": "black-box: fresh queries that must all misclassify before an item counts as broken"})
    draws: int = field(default=32, metadata={"help": "a randomized target (RCI, input noise) is scored on this many draws per item: expected accuracy"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    sanity: bool = field(default=True, metadata={"help": "run the sanity checks (identity permutation, iterative <= one step, large eps; thresholds shared with the report)"})

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; known: {list(ATTACKS)}")
        if self.threat not in THREATS:
            raise ValueError(f"unknown threat {self.threat!r}; known: {list(THREATS)}")
        if self.attack == "square" and self.threat != "blackbox":
            raise ValueError("attack 'square' is the black-box attack: it needs threat 'blackbox'")
        if self.attack in GRADIENT_ATTACKS and self.threat == "blackbox":
            raise ValueError(f"attack {self.attack!r} needs gradients: use threat 'transfer' or 'adaptive' (or attack 'square')")
        if self.attack == "eot-pgd" and self.threat != "adaptive":
            raise ValueError("attack 'eot-pgd' averages over RCI's randomness: it is the 'adaptive' threat")
        if any(e < 0 or e > 1 for e in self.eps):
            raise ValueError(f"eps values must lie in [0, 1] (pixels are in [0, 1]), got {self.eps}")
        counts = {"samples": self.samples, "steps": self.steps, "restarts": self.restarts, "eot_samples": self.eot_samples, "queries": self.queries, "score_queries": self.score_queries, "confirm": self.confirm, "draws": self.draws}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"these must be positive: {bad}")


def report_suite(cfg: AttackConfig, ck: Checkpoint, spec: CodingSpec, threat: str, x, y, clean_pool, eps: float) -> torch.Tensor:
    """The report's own stages at one ε: the white-box cascade (APGD-CE, APGD-DLR, PGD-CE with restarts) on the model
    without RCI; with the adaptive threat against RCI, then the report's RCI cascade (that worst case transferred,
    EOT-APGD-CE and -DLR through RCI). ``--steps`` steps each, ``--eot-samples`` draws per gradient."""
    from .stages import rci_stage, whitebox_stage

    suite = SuiteConfig(apgd_steps=cfg.steps, pgd_steps=cfg.steps, pgd_restarts=cfg.restarts, eot_draws=cfg.eot_samples, eot_steps=cfg.steps, seed=cfg.seed)
    plain = whitebox_stage(suite, ck, x, y, [eps])
    if threat != "adaptive" or not spec.enabled:
        return plain[f"{eps:g}"].x_adv
    return rci_stage(suite, ck, spec, x, y, clean_pool, plain, [eps], cfg.draws)[f"{eps:g}"].x_adv


def craft(attack: str, model_fn, x, y, eps: float, cfg: AttackConfig, eot: int) -> torch.Tensor:
    if attack == "fgsm":
        return fgsm(model_fn, x, y, eps, eot_samples=eot)
    gen = torch.Generator().manual_seed(cfg.seed)
    if attack == "apgd":
        return apgd(model_fn, x, y, eps, steps=cfg.steps, loss="ce", eot=eot, generator=gen)
    return pgd(model_fn, x, y, eps, steps=cfg.steps, eot_samples=eot, generator=gen)


def surrogate_for(threat: str, ck: Checkpoint, spec: CodingSpec, clean_pool, seed: int) -> RCIModel:
    """The model the attacker differentiates: the plain model (transfer) or the RCI model (adaptive)."""
    if threat == "transfer" or not spec.enabled:
        return RCIModel(ck, CodingSpec.plain())
    return RCIModel(ck, spec, clean_pool, seed=seed + 1)


def _eot(attack: str, threat: str, cfg: AttackConfig) -> int:
    return cfg.eot_samples if threat == "adaptive" and attack in ("eot-pgd", "fgsm") else 1


def robust_accuracy(cfg: AttackConfig, ck: Checkpoint, target, x, y, clean_pool, attack: str | None = None, threat: str | None = None, eps_list=None, progress: str | None = None,
                    queries: dict | None = None) -> dict[str, float]:
    """Per ε, the expected accuracy (over ``cfg.draws`` draws of a randomized target) on the attack's inputs."""
    attack, threat = attack or cfg.attack, threat or cfg.threat
    out = {}
    bar = tqdm(eps_list or cfg.eps, desc=progress or f"{attack}/{threat}", leave=False, disable=None)
    for eps in bar:
        if attack == "apgd":
            x_adv = report_suite(cfg, ck, target.spec, threat, x, y, clean_pool, eps)
        elif attack == "square":
            res = query_attack(target, x, y, eps, cfg.queries, cfg.score_queries, cfg.confirm, cfg.seed)
            x_adv = res["x_adv"]
            if queries is not None:
                q = res["queries"].double()
                queries[f"{eps:g}"] = {"median": float(q.median()), "p90": float(torch.quantile(q, 0.9)), "confirmed_broken": int(res["broken"].sum())}
        else:
            fn = surrogate_for(threat, ck, target.spec, clean_pool, cfg.seed)
            x_adv = craft(attack, fn, x, y, eps, cfg, _eot(attack, threat, cfg))
        out[f"{eps:g}"] = expected_accuracy(target, x_adv, y, cfg.draws)
    return out


def sanity_checks(cfg: AttackConfig, ck: Checkpoint, spec: CodingSpec, target, x, y, clean_pool, robust: dict[str, float]) -> list[dict]:
    """The shared checks (:mod:`.checks`, one set of thresholds) that apply to this attack."""
    checks = []
    setting = target.name
    if cfg.attack in GRADIENT_ATTACKS:
        attack_no_rci = "pgd" if cfg.attack == "eot-pgd" else cfg.attack
        if spec.enabled:
            for eps in cfg.eps:
                checks.append(identity_permutation(ck, spec, clean_pool, x, y, eps, lambda fn, xx, yy, e: craft(attack_no_rci, fn, xx, yy, e, cfg, 1), seed=cfg.seed + 2,
                                                   model=ck.name, setting=f"{spec.label()}, every draw fixed"))
        if cfg.attack in ("pgd", "apgd", "eot-pgd"):
            fg = robust_accuracy(cfg, ck, target, x, y, clean_pool, attack="fgsm", progress="sanity: fgsm")
            for e in robust:
                checks.append(check("iterative ≤ one step", robust[e], fg[e], model=ck.name, setting=setting, eps=float(e),
                                    numbers=f"{cfg.attack} {100 * robust[e]:.1f} % vs FGSM {100 * fg[e]:.1f} % (n = {len(y)})"))
    large = robust_accuracy(cfg, ck, target, x, y, clean_pool, eps_list=[LARGE_EPS], progress="sanity: large eps")[f"{LARGE_EPS:g}"]
    checks.append(check("large eps", large, model=ck.name, setting=setting, eps=LARGE_EPS, numbers=f"{100 * large:.1f} % at ε = {LARGE_EPS:g} (n = {len(y)})"))
    return checks


def run_attack(cfg: AttackConfig, ck: Checkpoint, target, x, y, clean_pool) -> dict:
    """The JSON report of one ``codedsmooth attack`` run."""
    cfg.validate()
    spec = target.spec
    report = {
        "checkpoint": ck.name,
        "target": target.name,
        "rci": spec.to_dict(),
        "config": asdict(cfg),
        "clean_accuracy": {"no_rci": expected_accuracy(InProcessTarget(RCIModel(ck, CodingSpec.plain())), x, y, 1), "target": expected_accuracy(target, x, y, cfg.draws)},
        "draws": cfg.draws if is_randomized(target) else 1,
    }
    if cfg.attack == "cotenant":
        from .cotenant import cotenant_report

        report.update(cotenant_report(cfg, ck, spec, target, x, y, clean_pool))
        return report
    before = target.queries
    queries: dict = {}
    report["robust_accuracy"] = robust_accuracy(cfg, ck, target, x, y, clean_pool, queries=queries)
    report["target_queries"] = target.queries - before
    if queries:
        report["queries_per_image"] = queries
    if cfg.sanity:
        report["sanity"] = sanity_checks(cfg, ck, spec, target, x, y, clean_pool, report["robust_accuracy"])
    return report
