"""Evaluating one attack of the registry (:mod:`.attacks`): robust accuracy per ε and the built-in sanity checks (Carlini et al. 2019)."""

from __future__ import annotations

from dataclasses import asdict

from tqdm.auto import tqdm

from codedsmooth.core import CodingSpec
from codedsmooth.models import Checkpoint

from .attacks import ATTACKS, DEPRECATED, THREATS, Attack, AttackConfig, attack_name
from .checks import LARGE_EPS, check, identity_permutation
from .targets import InProcessTarget, RCIModel, expected_accuracy, is_randomized

__all__ = ["ATTACKS", "DEPRECATED", "THREATS", "AttackConfig", "robust_accuracy", "run_attack", "sanity_checks"]


def robust_accuracy(
    cfg: AttackConfig,
    ck: Checkpoint,
    target,
    x,
    y,
    clean_pool,
    attack: str | None = None,
    threat: str | None = None,
    eps_list=None,
    progress: str | None = None,
    queries: dict | None = None,
) -> dict[str, float]:
    """Per ε, the expected accuracy (over ``cfg.draws`` draws of a randomized target) on the attack's inputs."""
    name, threat = attack_name(attack or cfg.attack), threat or cfg.threat
    runner = ATTACKS[name](cfg, ck, target, clean_pool, threat)
    out = {}
    bar = tqdm(eps_list or cfg.eps, desc=progress or f"{name}/{threat}", leave=False, disable=None)
    for eps in bar:
        out[f"{eps:g}"] = expected_accuracy(target, runner.craft(x, y, eps), y, cfg.draws)
    if queries is not None:
        queries.update(runner.extras.get("queries_per_image", {}))
    return out


def sanity_checks(
    cfg: AttackConfig, ck: Checkpoint, spec: CodingSpec, target, x, y, clean_pool, robust: dict[str, float]
) -> list[dict]:
    """The shared checks (:mod:`.checks`, one set of thresholds) that apply to this attack, as its class says."""
    checks = []
    setting = target.name
    attack: Attack = cfg.attack_class(cfg, ck, target, clean_pool)
    if spec.enabled and attack.needs == "gradients":
        for eps in cfg.eps:
            checks.append(
                identity_permutation(
                    ck,
                    spec,
                    clean_pool,
                    x,
                    y,
                    eps,
                    attack.fixed_craft,
                    seed=cfg.seed + 2,
                    model=ck.name,
                    setting=f"{spec.label()}, every draw fixed",
                )
            )
    if attack.iterative:
        fg = robust_accuracy(cfg, ck, target, x, y, clean_pool, attack="fgsm", progress="sanity: fgsm")
        for e in robust:
            checks.append(
                check(
                    "iterative ≤ one step",
                    robust[e],
                    fg[e],
                    model=ck.name,
                    setting=setting,
                    eps=float(e),
                    numbers=f"{cfg.attack} {100 * robust[e]:.1f} % vs FGSM {100 * fg[e]:.1f} % (n = {len(y)})",
                )
            )
    large = robust_accuracy(cfg, ck, target, x, y, clean_pool, eps_list=[LARGE_EPS], progress="sanity: large eps")[
        f"{LARGE_EPS:g}"
    ]
    checks.append(
        check(
            "large eps",
            large,
            model=ck.name,
            setting=setting,
            eps=LARGE_EPS,
            numbers=f"{100 * large:.1f} % at ε = {LARGE_EPS:g} (n = {len(y)})",
        )
    )
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
        "clean_accuracy": {
            "no_rci": expected_accuracy(InProcessTarget(RCIModel(ck, CodingSpec.plain())), x, y, 1),
            "target": expected_accuracy(target, x, y, cfg.draws),
        },
        "draws": cfg.draws if is_randomized(target) else 1,
    }
    attack = cfg.attack_class(cfg, ck, target, clean_pool)
    if not attack.per_eps:
        report.update(attack.run(x, y))
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
