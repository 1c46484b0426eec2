"""Threat models, their evaluation and the built-in sanity checks (Carlini et al. 2019)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import fgsm, pgd
from codedsmooth.models import Checkpoint

from .square import square_attack
from .targets import InProcessTarget, RCIModel, accuracy

GRADIENT_ATTACKS = ("fgsm", "pgd", "eot-pgd")
LARGE_EPS = 0.5


ATTACKS = (*GRADIENT_ATTACKS, "square", "cotenant")
THREATS = ("transfer", "adaptive", "blackbox")


@dataclass
class AttackConfig:
    """One attack run; ``codedsmooth attack`` takes its options and defaults from these fields."""

    attack: str = field(default="pgd", metadata={"help": "attack", "choices": ATTACKS})
    threat: str = field(default="adaptive", metadata={
        "help": "transfer: gradients of the model without RCI; adaptive: gradients through RCI (EOT for eot-pgd and fgsm); blackbox: queries only",
        "choices": THREATS,
    })
    eps: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "L∞ radius in pixel units [0, 1]; several values for a sweep"})
    steps: int = field(default=20, metadata={"help": "PGD steps; co-tenant optimisation steps"})
    eot_samples: int = field(default=8, metadata={"help": "RCI draws averaged per gradient in EOT"})
    samples: int = field(default=200, metadata={"help": "test items attacked"})
    queries: int = field(default=300, metadata={"help": "black-box query budget per item"})
    repeats: int = field(default=1, metadata={"help": "black-box: queries averaged per candidate against RCI's randomness"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    sanity: bool = field(default=True, metadata={"help": "run the sanity checks (identity permutation, PGD <= FGSM, large eps)"})

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
        counts = {"samples": self.samples, "steps": self.steps, "eot_samples": self.eot_samples, "queries": self.queries, "repeats": self.repeats}
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"these must be positive: {bad}")


def craft(attack: str, model_fn, x, y, eps: float, cfg: AttackConfig, eot: int) -> torch.Tensor:
    if attack == "fgsm":
        return fgsm(model_fn, x, y, eps, eot_samples=eot)
    gen = torch.Generator().manual_seed(cfg.seed)
    return pgd(model_fn, x, y, eps, steps=cfg.steps, eot_samples=eot, generator=gen)


def surrogate_for(threat: str, ck: Checkpoint, spec: CodingSpec, clean_pool, seed: int) -> RCIModel:
    """The model the attacker differentiates: the plain model (transfer) or the RCI model (adaptive)."""
    if threat == "transfer" or not spec.enabled:
        return RCIModel(ck, CodingSpec.plain())
    return RCIModel(ck, spec, clean_pool, seed=seed + 1)


def _eot(attack: str, threat: str, cfg: AttackConfig) -> int:
    return cfg.eot_samples if threat == "adaptive" and attack in ("eot-pgd", "fgsm") else 1


def robust_accuracy(cfg: AttackConfig, ck: Checkpoint, target, x, y, clean_pool, attack: str | None = None, threat: str | None = None, eps_list=None, progress: str | None = None) -> dict[str, float]:
    attack, threat = attack or cfg.attack, threat or cfg.threat
    out = {}
    bar = tqdm(eps_list or cfg.eps, desc=progress or f"{attack}/{threat}", leave=False, disable=None)
    for eps in bar:
        if attack == "square":
            x_adv, _ = square_attack(target.predict_proba, x, y, eps, queries=cfg.queries, repeats=cfg.repeats, generator=torch.Generator().manual_seed(cfg.seed))
        else:
            fn = surrogate_for(threat, ck, target.spec, clean_pool, cfg.seed)
            x_adv = craft(attack, fn, x, y, eps, cfg, _eot(attack, threat, cfg))
        out[f"{eps:g}"] = accuracy(target, x_adv, y)
    return out


def sanity_checks(cfg: AttackConfig, ck: Checkpoint, spec: CodingSpec, target, x, y, clean_pool, robust: dict[str, float]) -> list[dict]:
    """Checks that the attack is working and the numbers mean what they say."""
    checks = []
    plain = RCIModel(ck, CodingSpec.plain())
    plain_target = InProcessTarget(plain)
    if cfg.attack in GRADIENT_ATTACKS:
        attack_no_rci = "pgd" if cfg.attack == "eot-pgd" else cfg.attack
        no_rci = robust_accuracy(cfg, ck, plain_target, x, y, clean_pool, attack=attack_no_rci, threat="transfer", progress="sanity: no rci")
        if spec.enabled:
            fixed = RCIModel(ck, spec, clean_pool, seed=cfg.seed + 2, deterministic=True)
            identity = {}
            for eps in cfg.eps:
                x_adv = craft(attack_no_rci, fixed, x, y, eps, cfg, 1)
                identity[f"{eps:g}"] = accuracy(InProcessTarget(fixed), x_adv, y)
            worst = max(identity[k] - no_rci[k] for k in identity)
            checks.append({
                "name": "identity permutation",
                "what": "attacking RCI with the permutation fixed to the identity (and fixed companions) reaches about the no-RCI accuracy",
                "value": identity, "reference": no_rci, "passed": worst <= 0.1,
            })
        if cfg.attack in ("pgd", "eot-pgd"):
            fg = robust_accuracy(cfg, ck, target, x, y, clean_pool, attack="fgsm", progress="sanity: fgsm")
            worst = max(robust[k] - fg[k] for k in robust)
            checks.append({"name": "pgd <= fgsm", "what": "the iterative attack is at least as strong as one step", "value": robust, "reference": fg, "passed": worst <= 0.03})
    large = robust_accuracy(cfg, ck, target, x, y, clean_pool, eps_list=[LARGE_EPS], progress="sanity: large eps")
    checks.append({"name": "large eps", "what": f"at eps = {LARGE_EPS} the attack drives accuracy to about 0", "value": large, "reference": {f"{LARGE_EPS:g}": 0.0}, "passed": large[f"{LARGE_EPS:g}"] <= 0.1})
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
        "clean_accuracy": {"no_rci": accuracy(InProcessTarget(RCIModel(ck, CodingSpec.plain())), x, y), "target": accuracy(target, x, y)},
    }
    if cfg.attack == "cotenant":
        from .cotenant import cotenant_report

        report.update(cotenant_report(cfg, ck, spec, target, x, y, clean_pool))
        return report
    before = target.queries
    report["robust_accuracy"] = robust_accuracy(cfg, ck, target, x, y, clean_pool)
    report["target_queries"] = target.queries - before
    if cfg.sanity:
        report["sanity"] = sanity_checks(cfg, ck, spec, target, x, y, clean_pool, report["robust_accuracy"])
    return report
