"""The report's checks: paired McNemar tests on per-image worst cases, and Carlini et al. (2019)-style
sanity checks, each stating its numbers and whether it passed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from codedsmooth.core import SCOPES, CodingSpec
from codedsmooth.core.attacks import apgd

from .stats import mcnemar
from .suite import Outcome, SuiteConfig, attacker_and_scorer, run_cascade, whitebox_attacks
from .targets import RCIModel

if TYPE_CHECKING:
    from .report import ReportConfig


def paired_tests(models: dict, cfg: ReportConfig) -> list[dict]:
    """McNemar on per-image worst-case outcomes: methods against each other (no RCI), RCI on vs off (per method)."""
    rows = []
    methods = [m for m in cfg.methods if any(k[0] == m for k in models)]
    pairs = [(a, b) for a in ("coded", "pgd-at") for b in methods if a in methods and a != b and not (a == "pgd-at" and b == "coded")]
    for eps in (f"{e:g}" for e in cfg.eps):
        for a, b in pairs:
            tests = []
            for seed in cfg.seeds:
                oa, ob = models[(a, seed)]["_outcomes"]["plain"][eps], models[(b, seed)]["_outcomes"]["plain"][eps]
                t = mcnemar(oa.majority(), ob.majority())
                tests.append({"seed": seed, "diff": oa.accuracy - ob.accuracy, "only_a": t.only_a, "only_b": t.only_b, "p": t.p_value})
            rows.append({"eps": eps, "a": f"{a}", "b": f"{b}", "setting": "no RCI", "tests": tests})
        for m in methods:
            for scope in SCOPES:
                tests = []
                for seed in cfg.seeds:
                    o = models[(m, seed)]["_outcomes"]
                    on = o[scope][eps]
                    off_majority = o["plain"][eps].majority()[: on.correct.shape[1]]
                    off_acc = float(off_majority.float().mean())
                    t = mcnemar(on.majority(), off_majority)
                    tests.append({"seed": seed, "diff": float(on.majority().float().mean()) - off_acc, "only_a": t.only_a, "only_b": t.only_b, "p": t.p_value})
                rows.append({"eps": eps, "a": f"{m}, RCI {scope}", "b": f"{m}, no RCI", "setting": scope, "tests": tests})
    return rows


def sanity_checks(cfg: ReportConfig, suite: SuiteConfig, models: dict, cks: dict, x_all, y_all, pool) -> list[dict]:
    """Carlini et al. (2019)-style checks; each states its numbers and whether it passed."""
    checks = []
    first = cfg.seeds[0]
    last_eps = f"{cfg.eps[-1]:g}"
    # 1. black-box never beats white-box
    for m in cfg.methods:
        sq = models[(m, first)].get("square")
        if not sq:
            continue
        for setting in ("plain", "request"):
            r = sq[setting]
            checks.append({
                "name": "black-box ≤ white-box", "model": f"{m} seed {first}", "setting": setting, "eps": sq["eps"],
                "value": f"Square {100 * r['accuracy']:.1f} % vs white-box {100 * r['whitebox_accuracy']:.1f} % (n = {r['images']})",
                "passed": r["accuracy"] >= r["whitebox_accuracy"],
            })
    # 2. transferred examples are weaker than white-box ones (the next seed's adversarials on this seed's model)
    if len(cfg.seeds) > 1:
        for m in cfg.methods:
            a, b = cfg.seeds[0], cfg.seeds[1]
            target = RCIModel(cks[(m, a)], CodingSpec.plain())
            for eps in (f"{e:g}" for e in cfg.eps):
                src = models[(m, b)]["_outcomes"]["plain"][eps]
                own = models[(m, a)]["_outcomes"]["plain"][eps]
                with torch.no_grad():
                    acc = float((target(src.x_adv).argmax(1) == y_all[: len(src.x_adv)]).float().mean())
                checks.append({
                    "name": "transfer ≤ white-box", "model": f"{m} seed {a} (from seed {b})", "setting": "plain", "eps": float(eps),
                    "value": f"transferred {100 * acc:.1f} % vs white-box {100 * own.accuracy:.1f} % (n = {own.correct.shape[1]})",
                    "passed": acc >= own.accuracy,
                })
    # 3. more steps and restarts no longer help: doubled budgets on the survivors of the most robust model
    best = max(cfg.methods, key=lambda m: models[(m, first)]["_outcomes"]["plain"][last_eps].accuracy)
    ck = cks[(best, first)]
    base = models[(best, first)]["_outcomes"]["plain"][last_eps]
    n = min(cfg.rci_images, base.correct.shape[1])
    sub = Outcome(base.x_adv[:n].clone(), base.correct[:, :n].clone())
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), pool, 1, suite.seed)
    stronger = SuiteConfig(apgd_steps=2 * suite.apgd_steps, pgd_steps=2 * suite.pgd_steps, pgd_restarts=2 * suite.pgd_restarts, seed=suite.seed + 11)
    more = run_cascade(whitebox_attacks(plain_model, cfg.eps[-1], stronger), plain_scorer, x_all[:n], y_all[:n], sub)
    drop = sub.accuracy - more.accuracy
    checks.append({
        "name": "more steps and restarts no longer help", "model": f"{best} seed {first}", "setting": "plain", "eps": cfg.eps[-1],
        "value": f"{100 * sub.accuracy:.1f} % → {100 * more.accuracy:.1f} % with every attack's steps and restarts doubled (n = {n})",
        "passed": drop <= 0.01,
    })
    # 4. the ε-curve reaches about 0 where a human still sees the digit
    for m in cfg.methods:
        extra = models[(m, first)].get("curve_extra", {})
        if extra:
            top = max(extra, key=float)
            acc = extra[top]["accuracy"]
            checks.append({
                "name": "ε-curve reaches ~0", "model": f"{m} seed {first}", "setting": "plain", "eps": float(top),
                "value": f"{100 * acc:.1f} % at ε = {top} (n = {extra[top]['n']})", "passed": acc <= 0.02,
            })
    # 5. identity permutation: RCI with every draw fixed is a deterministic model that white-box APGD breaks like the plain one
    if "coded" in cfg.methods:
        ck = cks[("coded", first)]
        eps = cfg.eps[0]
        n = cfg.rci_images
        x, y = x_all[:n], y_all[:n]
        fixed = RCIModel(ck, ck.coding_spec(scope="request"), pool, seed=5, deterministic=True)
        plain = RCIModel(ck, CodingSpec.plain())
        gen = lambda: torch.Generator().manual_seed(suite.seed)  # noqa: E731
        with torch.no_grad():
            acc_fixed = float((fixed(apgd(fixed, x, y, eps, steps=suite.apgd_steps, generator=gen())).argmax(1) == y).float().mean())
            acc_plain = float((plain(apgd(plain, x, y, eps, steps=suite.apgd_steps, generator=gen())).argmax(1) == y).float().mean())
        checks.append({
            "name": "identity permutation", "model": f"coded seed {first}", "setting": "request, every draw fixed", "eps": eps,
            "value": f"APGD-CE {100 * acc_fixed:.1f} % with RCI fixed vs {100 * acc_plain:.1f} % without RCI (n = {n})",
            "passed": acc_fixed <= acc_plain + 0.05,
        })
    return checks
