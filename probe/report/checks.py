"""The report's sanity checks (Carlini et al. 2019), with the thresholds shared with ``codedsmooth attack`` (:data:`..checks.CHECKS`)."""

from __future__ import annotations

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import apgd

from ..checks import _accuracy, check, identity_permutation
from ..suite import Outcome, SuiteConfig, attacker_and_scorer, run_cascade, whitebox_attacks
from ..targets import RCIModel
from .config import ReportConfig


def sanity_checks(
    cfg: ReportConfig, suite: SuiteConfig, outcomes: dict, cks: dict, xs: dict, ys: dict, pool, blackbox: dict | None
) -> list[dict]:
    """The report's checks (thresholds in :data:`CHECKS`); each states its numbers and whether it passed."""
    checks = []
    last_eps = f"{cfg.eps[-1]:g}"
    first = {m: cfg.seeds_of(m)[0] for m in cfg.methods}
    # 1. black-box never beats white-box (the largest budget, and each transfer source; the white-box worst case before they joined it)
    bb = blackbox or {}
    for row in bb.get("rows", []):
        if row["server"] in ("plain", "request") and (
            row["budget"] == max(cfg.budgets_of(row["method"]))
            and row["score_queries"] == cfg.score_queries
            or row["attacker"].startswith("transfer")
        ):
            attacker = (
                row["attacker"] if row["attacker"].startswith("transfer") else f"{row['attacker']} ({row['budget']} q)"
            )
            checks.append(
                check(
                    "black-box ≤ white-box",
                    row["accuracy"],
                    row["whitebox_accuracy"],
                    model=f"{row['method']} seed {first[row['method']]}",
                    setting=row["server"],
                    eps=bb["eps"],
                    numbers=f"{attacker} {100 * row['accuracy']:.1f} % vs white-box {100 * row['whitebox_accuracy']:.1f} % (n = {row['n']})",
                )
            )
    # 2. transferred examples are weaker than white-box ones (the next seed's adversarials on this seed's model)
    for m in cfg.methods:
        seeds = cfg.seeds_of(m)
        if len(seeds) < 2:
            continue
        a, b = seeds[0], seeds[1]
        target = RCIModel(cks[(m, a)], CodingSpec.plain())
        for eps in (f"{e:g}" for e in cfg.eps):
            src = outcomes[(m, b)]["plain"][eps]
            own = outcomes[(m, a)]["plain"][eps]
            acc = _accuracy(target, src.x_adv, ys["white-box"])
            checks.append(
                check(
                    "transfer ≤ white-box",
                    acc,
                    own.accuracy,
                    model=f"{m} seed {a} (from seed {b})",
                    setting="plain",
                    eps=float(eps),
                    numbers=f"transferred {100 * acc:.1f} % vs white-box {100 * own.accuracy:.1f} % (n = {own.correct.shape[1]})",
                )
            )
    # 3. more steps and restarts no longer help: doubled budgets on the most robust model, RCI sample
    best = max(cfg.methods, key=lambda m: outcomes[(m, first[m])]["plain"][last_eps].accuracy)
    ck = cks[(best, first[best])]
    base = outcomes[(best, first[best])]["plain"][last_eps]
    n = len(ys["rci"])
    sub = Outcome(base.x_adv[:n].clone(), base.correct[:, :n].clone())
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), pool, 1, suite.seed)
    stronger = SuiteConfig(
        apgd_steps=2 * suite.apgd_steps,
        pgd_steps=2 * suite.pgd_steps,
        pgd_restarts=2 * suite.pgd_restarts,
        seed=suite.seed + 11,
    )
    more = run_cascade(whitebox_attacks(plain_model, cfg.eps[-1], stronger), plain_scorer, xs["rci"], ys["rci"], sub)
    checks.append(
        check(
            "more steps and restarts no longer help",
            more.accuracy,
            sub.accuracy,
            model=f"{best} seed {first[best]}",
            setting="plain",
            eps=cfg.eps[-1],
            numbers=f"{100 * sub.accuracy:.1f} % → {100 * more.accuracy:.1f} % with every attack's steps and restarts doubled (n = {n})",
        )
    )
    # 4. the ε-curve reaches about 0 where a human still sees the digit
    for m in cfg.methods:
        extra = outcomes[(m, first[m])].get("curve", {})
        if extra:
            e = max(extra, key=float)
            acc = extra[e].accuracy
            checks.append(
                check(
                    "ε-curve reaches ~0",
                    acc,
                    model=f"{m} seed {first[m]}",
                    setting="plain",
                    eps=float(e),
                    numbers=f"{100 * acc:.1f} % at ε = {e} (n = {extra[e].correct.shape[1]})",
                )
            )
    # 5. identity permutation: RCI with every draw fixed is a deterministic model that white-box APGD breaks like the plain one
    if "coded" in cfg.methods:
        ck = cks[("coded", first["coded"])]
        first_eps = cfg.eps[0]

        def craft(model_fn, x, y, e):
            return apgd(model_fn, x, y, e, steps=suite.apgd_steps, generator=torch.Generator().manual_seed(suite.seed))

        checks.append(
            identity_permutation(
                ck,
                ck.coding_spec(scope="request"),
                pool,
                xs["rci"],
                ys["rci"],
                first_eps,
                craft,
                seed=5,
                model=f"coded seed {first['coded']}",
                setting="request, every draw fixed",
            )
        )
    return checks
