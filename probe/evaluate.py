"""Threat models, their evaluation and the built-in sanity checks (Carlini et al. 2019)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from codedsmooth.core import CodingSpec
from codedsmooth.models import Checkpoint

from .attacks import fgsm, pgd, square_attack
from .targets import InProcessTarget, RCIModel, accuracy

GRADIENT_ATTACKS = ("fgsm", "pgd", "eot-pgd")
LARGE_EPS = 0.5


@dataclass
class AttackConfig:
    attack: str = "pgd"
    threat: str = "adaptive"
    eps: list[float] = field(default_factory=lambda: [0.1])
    steps: int = 20
    eot_samples: int = 8
    samples: int = 200
    queries: int = 300
    repeats: int = 1
    seed: int = 0
    sanity: bool = True

    def validate(self) -> None:
        if self.attack not in (*GRADIENT_ATTACKS, "square", "cotenant"):
            raise ValueError(f"unknown attack {self.attack!r}")
        if self.threat not in ("transfer", "adaptive", "blackbox"):
            raise ValueError(f"unknown threat {self.threat!r}")
        if self.attack == "square" and self.threat != "blackbox":
            raise ValueError("--attack square is the black-box attack: use --threat blackbox")
        if self.attack in GRADIENT_ATTACKS and self.threat == "blackbox":
            raise ValueError(f"--attack {self.attack} needs gradients: use --threat transfer or adaptive (or --attack square)")
        if self.attack == "eot-pgd" and self.threat != "adaptive":
            raise ValueError("--attack eot-pgd averages over RCI's randomness: it is the adaptive threat")
        if any(e < 0 or e > 1 for e in self.eps):
            raise ValueError("--eps values must lie in [0, 1] (pixels are in [0, 1])")
        if self.samples < 1 or self.steps < 1 or self.eot_samples < 1 or self.queries < 1 or self.repeats < 1:
            raise ValueError("--samples, --steps, --eot-samples, --queries and --repeats must be positive")


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
