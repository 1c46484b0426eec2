"""Checks of the evaluation itself, shared by ``codedsmooth attack`` and ``codedsmooth report``: Carlini et
al. (2019)-style sanity checks with one set of thresholds, each stating what it checks, its numbers
and whether it passed; and the report's paired McNemar tests on per-image worst cases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from codedsmooth.core import SCOPES, CodingSpec
from codedsmooth.core.attacks import apgd

from .stats import mcnemar
from .suite import Outcome, SuiteConfig, attacker_and_scorer, run_cascade, whitebox_attacks
from .targets import RCIModel

if TYPE_CHECKING:
    from .report import ReportConfig

LARGE_EPS = 0.5
# name: (what it checks, tolerance, passes(measured, reference, tolerance)). Accuracies are shares in [0, 1].
CHECKS: dict[str, tuple[str, float, Callable[[float, float | None, float], bool]]] = {
    "identity permutation": ("attacking RCI with every draw fixed (identity permutation, fixed companions) reaches the no-RCI accuracy: the attack can break the coded model when nothing is random",
                             0.05, lambda m, r, t: m <= r + t),
    "iterative ≤ one step": ("the iterative attack is at least as strong as one FGSM step", 0.03, lambda m, r, t: m <= r + t),
    "large eps": (f"at ε = {LARGE_EPS} (where a human no longer sees the digit) the attack drives accuracy to about 0", 0.10, lambda m, r, t: m <= t),
    "black-box ≤ white-box": ("a query or transfer attack does not find more than the white-box worst case on the same images", 0.0, lambda m, r, t: m >= r - t),
    "transfer ≤ white-box": ("adversarials of another seed's model do less harm than the model's own white-box ones", 0.0, lambda m, r, t: m >= r - t),
    "more steps and restarts no longer help": ("doubling every attack's steps and restarts lowers the worst case by at most the tolerance (the suite has converged)", 0.01, lambda m, r, t: r - m <= t),
    "ε-curve reaches ~0": ("the ε-curve reaches about 0 at its largest ε", 0.02, lambda m, r, t: m <= t),
}


def check(name: str, measured: float, reference: float | None = None, *, numbers: str, **context) -> dict:
    """One check's record: what it checks, its numbers, the tolerance and whether it passed."""
    what, tolerance, passes = CHECKS[name]
    return {"name": name, "what": what, **context, "value": numbers, "measured": measured, "reference": reference, "tolerance": tolerance,
            "passed": bool(passes(measured, reference, tolerance))}


def failure_lines(checks: list[dict]) -> list[str]:
    """A failed check, printed with what it checks and its numbers."""
    return [f"sanity check failed: {c['name']} ({c['what']}): {c['value']} (tolerance {100 * c['tolerance']:g} points)" for c in checks if not c["passed"]]


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def identity_permutation(ck, spec: CodingSpec, pool, x, y, eps: float, craft: Callable, seed: int, **context) -> dict:
    """``craft(model_fn, x, y, eps)`` against RCI with every draw fixed, and against the plain model."""
    fixed = RCIModel(ck, spec, pool, seed=seed, deterministic=True)
    plain = RCIModel(ck, CodingSpec.plain())
    acc_fixed = _accuracy(fixed, craft(fixed, x, y, eps), y)
    acc_plain = _accuracy(plain, craft(plain, x, y, eps), y)
    return check("identity permutation", acc_fixed, acc_plain, eps=eps, numbers=f"{100 * acc_fixed:.1f} % with RCI fixed vs {100 * acc_plain:.1f} % without RCI (n = {len(y)})", **context)


def paired_tests(outcomes: dict, cfg: ReportConfig) -> list[dict]:
    """McNemar on per-image worst-case outcomes: methods against each other (no RCI, the seeds both have), RCI on vs off (per method, every seed)."""
    rows = []
    methods = [m for m in cfg.methods if any(k[0] == m for k in outcomes)]
    pairs = [(a, b) for a in ("coded", "pgd-at") for b in methods if a in methods and a != b and not (a == "pgd-at" and b == "coded")]
    for eps in (f"{e:g}" for e in cfg.eps):
        for a, b in pairs:
            tests = []
            for seed in (s for s in cfg.seeds_of(a) if s in cfg.seeds_of(b)):
                oa, ob = outcomes[(a, seed)]["plain"][eps], outcomes[(b, seed)]["plain"][eps]
                t = mcnemar(oa.majority(), ob.majority())
                tests.append({"seed": seed, "diff": oa.accuracy - ob.accuracy, "only_a": t.only_a, "only_b": t.only_b, "p": t.p_value})
            rows.append({"eps": eps, "a": f"{a}", "b": f"{b}", "setting": "no RCI", "tests": tests})
        for m in methods:
            for scope in SCOPES:
                tests = []
                for seed in cfg.seeds_of(m):
                    o = outcomes[(m, seed)]
                    on = o[scope][eps]
                    off_majority = o["plain"][eps].majority()[: on.correct.shape[1]]
                    off_acc = float(off_majority.float().mean())
                    t = mcnemar(on.majority(), off_majority)
                    tests.append({"seed": seed, "diff": float(on.majority().float().mean()) - off_acc, "only_a": t.only_a, "only_b": t.only_b, "p": t.p_value})
                rows.append({"eps": eps, "a": f"{m}, RCI {scope}", "b": f"{m}, no RCI", "setting": scope, "tests": tests})
    return rows


def sanity_checks(cfg: ReportConfig, suite: SuiteConfig, outcomes: dict, cks: dict, xs: dict, ys: dict, pool, blackbox: dict | None) -> list[dict]:
    """The report's checks (thresholds in :data:`CHECKS`); each states its numbers and whether it passed."""
    checks = []
    last_eps = f"{cfg.eps[-1]:g}"
    first = {m: cfg.seeds_of(m)[0] for m in cfg.methods}
    # 1. black-box never beats white-box (the largest budget, and each transfer source; the white-box worst case before they joined it)
    for row in (blackbox or {}).get("rows", []):
        if row["server"] in ("plain", "request") and (row["budget"] == max(cfg.budgets_of(row["method"])) and row["score_queries"] == cfg.score_queries or row["attacker"].startswith("transfer")):
            attacker = row["attacker"] if row["attacker"].startswith("transfer") else f"{row['attacker']} ({row['budget']} q)"
            checks.append(check("black-box ≤ white-box", row["accuracy"], row["whitebox_accuracy"], model=f"{row['method']} seed {first[row['method']]}", setting=row["server"], eps=blackbox["eps"],
                                numbers=f"{attacker} {100 * row['accuracy']:.1f} % vs white-box {100 * row['whitebox_accuracy']:.1f} % (n = {row['n']})"))
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
            checks.append(check("transfer ≤ white-box", acc, own.accuracy, model=f"{m} seed {a} (from seed {b})", setting="plain", eps=float(eps),
                                numbers=f"transferred {100 * acc:.1f} % vs white-box {100 * own.accuracy:.1f} % (n = {own.correct.shape[1]})"))
    # 3. more steps and restarts no longer help: doubled budgets on the most robust model, RCI sample
    best = max(cfg.methods, key=lambda m: outcomes[(m, first[m])]["plain"][last_eps].accuracy)
    ck = cks[(best, first[best])]
    base = outcomes[(best, first[best])]["plain"][last_eps]
    n = len(ys["rci"])
    sub = Outcome(base.x_adv[:n].clone(), base.correct[:, :n].clone())
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), pool, 1, suite.seed)
    stronger = SuiteConfig(apgd_steps=2 * suite.apgd_steps, pgd_steps=2 * suite.pgd_steps, pgd_restarts=2 * suite.pgd_restarts, seed=suite.seed + 11)
    more = run_cascade(whitebox_attacks(plain_model, cfg.eps[-1], stronger), plain_scorer, xs["rci"], ys["rci"], sub)
    checks.append(check("more steps and restarts no longer help", more.accuracy, sub.accuracy, model=f"{best} seed {first[best]}", setting="plain", eps=cfg.eps[-1],
                        numbers=f"{100 * sub.accuracy:.1f} % → {100 * more.accuracy:.1f} % with every attack's steps and restarts doubled (n = {n})"))
    # 4. the ε-curve reaches about 0 where a human still sees the digit
    for m in cfg.methods:
        extra = outcomes[(m, first[m])].get("curve", {})
        if extra:
            e = max(extra, key=float)
            acc = extra[e].accuracy
            checks.append(check("ε-curve reaches ~0", acc, model=f"{m} seed {first[m]}", setting="plain", eps=float(e), numbers=f"{100 * acc:.1f} % at ε = {e} (n = {extra[e].correct.shape[1]})"))
    # 5. identity permutation: RCI with every draw fixed is a deterministic model that white-box APGD breaks like the plain one
    if "coded" in cfg.methods:
        ck = cks[("coded", first["coded"])]
        eps = cfg.eps[0]
        def craft(model_fn, x, y, e):
            return apgd(model_fn, x, y, e, steps=suite.apgd_steps, generator=torch.Generator().manual_seed(suite.seed))

        checks.append(identity_permutation(ck, ck.coding_spec(scope="request"), pool, xs["rci"], ys["rci"], eps, craft, seed=5,
                                           model=f"coded seed {first['coded']}", setting="request, every draw fixed"))
    return checks
