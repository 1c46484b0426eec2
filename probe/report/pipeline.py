"""``codedsmooth report``: erm, mixup, coded and pgd-at on MNIST, several training seeds, each
attacked plain and through RCI in both scopes by a suite that converges, plus query and transfer
attacks over HTTP against plain, RCI and input-noise servers, to docs/RESULTS.md.

This module is the order of the stages: :func:`run_report` runs :data:`STAGES` on one :class:`Run`,
each stage reading what earlier ones left there and adding its own part. Each stage's result is cached
under ``--runs`` (:mod:`..cache`), so a run can be interrupted and resumed. The options are in
:mod:`.config`; the models in :mod:`.training`; the per-model stages in :mod:`.stages` and
:mod:`..suite`; the attacks over HTTP in :mod:`.blackbox`; the size study in :mod:`.sizes`; the
checks and paired tests in :mod:`.checks` and :mod:`.paired`; the text in :mod:`.render`.
Everything measured goes to a JSON file beside the markdown, written first so the text can be
re-rendered from it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from codedsmooth.core import SCOPES
from codedsmooth.models import default_checkpoint_path, load_checkpoint
from codedsmooth.train import as_float, load_dataset
from codedsmooth.train.environment import environment

from ..cache import StageCache, digest
from ..samples import balanced_order, class_counts
from ..suite import Outcome, SuiteConfig, attacker_and_scorer, rci_stage, run_cascade, whitebox_attacks, whitebox_stage
from ..weights import checkpoint_record, publish
from .blackbox import blackbox_section
from .checks import sanity_checks
from .config import ReportConfig, stage_minutes
from .paired import paired_tests
from .render import render, write_figures
from .sizes import size_study
from .stages import (
    Clock,
    clean_correct,
    cotenant_table,
    curve_stage,
    default_checkpoint_accuracy,
    eot_curve,
    n_sweep,
    outcome_data,
    outcome_from,
    summary,
)
from .training import ensure_checkpoint, training_seconds

log = logging.getLogger("codedsmooth.report")


@dataclass
class Run:
    """What the stages share: the options and budgets, the cache and clock, and what each stage adds
    (models, samples, per-model outcomes, and ``extras``: the results file's sections, in order)."""

    cfg: ReportConfig
    out: Path
    suite: SuiteConfig
    cache: StageCache
    clock: Clock
    data: Any
    keys: list = field(default_factory=list)  # (method, seed) of every attacked model
    surrogate_keys: list = field(default_factory=list)
    attacked: list = field(default_factory=list)  # methods attacked over HTTP
    cks: dict = field(default_factory=dict)
    sha: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    order: Any = None
    samples: dict = field(default_factory=dict)
    xs: dict = field(default_factory=dict)
    ys: dict = field(default_factory=dict)
    x_all: Any = None
    y_all: Any = None
    pool: Any = None
    outcomes: dict = field(default_factory=dict)
    stage_keys: dict = field(default_factory=dict)
    rests: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def budgets(self) -> dict:
        cfg = self.cfg
        return {
            "apgd": cfg.apgd_steps,
            "pgd": cfg.pgd_steps,
            "restarts": cfg.pgd_restarts,
            "eps": cfg.eps,
            "seed": self.suite.seed,
        }

    @property
    def eot_budget(self) -> dict:
        return {"draws": self.cfg.draws, "eot_draws": self.cfg.eot_draws, "eot_steps": self.cfg.eot_steps}

    @property
    def first(self) -> dict:
        return {m: self.cfg.seeds_of(m)[0] for m in self.cfg.methods}

    @property
    def last(self) -> str:
        return f"{self.cfg.eps[-1]:g}"


def train_models(run: Run) -> None:
    """Train (or reuse) every model, the transfer attack's surrogates included; record their hashes and publish their weights."""
    cfg, t0 = run.cfg, time.monotonic()
    run.keys = [(m, s) for m in cfg.methods for s in cfg.seeds_of(m)]
    run.attacked = [
        m for m in cfg.blackbox_methods if m in cfg.methods
    ]  # over HTTP: the first seed of each method this run evaluates
    run.surrogate_keys = sorted(
        {(m, cfg.surrogate_seed) for m in run.attacked} | ({("erm", cfg.surrogate_seed)} if run.attacked else set())
    )
    if cfg.train_only:  # each part trains only its own --methods: parts side by side never train one model twice
        run.surrogate_keys = [k for k in run.surrogate_keys if k[0] in cfg.methods]
    paths = {k: ensure_checkpoint(cfg, k[0], k[1], run.data) for k in dict.fromkeys([*run.keys, *run.surrogate_keys])}
    run.clock.add("training (or reuse)", t0)
    run.trained = {f"{m}/seed{s}": training_seconds(p) for (m, s), p in paths.items()}
    run.records = {f"{m}/seed{s}": checkpoint_record(p) for (m, s), p in paths.items()}
    weights_dir = run.out.parent / "weights"
    run.published = {
        f"{m}/seed{s}": str(publish(p, weights_dir / f"{m}-seed{s}").relative_to(run.out.parent))
        for (m, s), p in paths.items()
    }
    run.sha = {k: r["model.safetensors"]["sha256"] for k, r in run.records.items()}
    run.cks = {k: load_checkpoint(p) for k, p in paths.items()}
    run.training = {f"{m}/seed{s}": ck.config.training.model_dump() for (m, s), ck in run.cks.items()}


def draw_samples(run: Run) -> None:
    """The class-stratified samples of the test split, each part of the larger ones, and the clean pool."""
    cfg, data = run.cfg, run.data
    run.order = balanced_order(data.test_y, cfg.sample_seed)
    classes = len(data.classes)
    sizes = {
        "white-box": cfg.images_per_class,
        "rci": cfg.rci_per_class,
        "black-box": cfg.blackbox_per_class,
        "eot-curve": cfg.curve_per_class,
        "cotenant": cfg.cotenant_per_class,
    }
    run.samples = {name: run.order[: k * classes] for name, k in sizes.items()}
    run.x_all, run.y_all = as_float(data.test_x), data.test_y
    run.pool = as_float(data.train_x[:512])
    run.xs = {name: run.x_all[idx] for name, idx in run.samples.items()}
    run.ys = {name: run.y_all[idx] for name, idx in run.samples.items()}


def attack_models(run: Run) -> None:
    """Per model: the white-box cascade without RCI, the RCI cascade in each scope, and (first seed) the ε-curve's extra points."""
    cfg, suite, cache, xs, ys, pool = run.cfg, run.suite, run.cache, run.xs, run.ys, run.pool
    bar = tqdm(run.keys, desc="attacking", disable=None)
    for key in bar:
        m, s = key
        ck, name = run.cks[key], f"{m}-seed{s}"
        base = {"checkpoint": run.sha[f"{m}/seed{s}"], "sample": run.samples["white-box"], **run.budgets}
        plain = cache.run(
            f"white-box/{name}",
            base,
            lambda ck=ck: {
                e: outcome_data(o)
                for e, o in whitebox_stage(suite, ck, xs["white-box"], ys["white-box"], cfg.eps).items()
            },
        )
        o = {"plain": {e: outcome_from(v) for e, v in plain.items()}}
        for scope in SCOPES:
            rkey = {**base, "scope": scope, "rci_sample": run.samples["rci"], **run.eot_budget}
            r = cache.run(
                f"rci-{scope}/{name}",
                rkey,
                lambda scope=scope, ck=ck, o=o: {
                    e: outcome_data(v)
                    for e, v in rci_stage(
                        suite,
                        ck,
                        ck.coding_spec(scope=scope),
                        xs["rci"],
                        ys["rci"],
                        pool,
                        o["plain"],
                        cfg.eps,
                        cfg.draws,
                    ).items()
                },
            )
            o[scope] = {e: outcome_from(v) for e, v in r.items()}
        if s == cfg.seeds_of(m)[0]:
            c = cache.run(
                f"curve/{name}",
                {**base, "curve_eps": cfg.curve_eps},
                lambda ck=ck, o=o: {
                    e: outcome_data(v)
                    for e, v in curve_stage(cfg, suite, ck, xs["white-box"], ys["white-box"], o["plain"]).items()
                },
            )
            o["curve"] = {e: outcome_from(v) for e, v in c.items()}
        run.outcomes[key] = o
        run.stage_keys[f"{m}/seed{s}"] = digest(base)
        bar.set_postfix_str(f"{ck.name} seed {s}: {100 * o['plain'][run.last].accuracy:.1f} % at ε = {cfg.eps[-1]:g}")


def choose_served(run: Run) -> None:
    """With --serve-min-clean: the model to serve, the most robust (worst case without RCI at the largest ε on the
    white-box sample) of those clean enough on the whole test split; ties go to the higher clean accuracy."""
    cfg = run.cfg
    if cfg.serve_min_clean is None:
        return
    clean = {key: float(clean_correct(run.cks[key], run.x_all, run.y_all).float().mean()) for key in run.keys}
    eligible = [key for key in run.keys if clean[key] >= cfg.serve_min_clean]
    if not eligible:
        log.warning("no model reaches clean accuracy %.3f: none is chosen to serve", cfg.serve_min_clean)
        return
    m, s = max(eligible, key=lambda k: (run.outcomes[k]["plain"][run.last].accuracy, clean[k]))
    run.extras["served"] = {
        "key": f"{m}/seed{s}",
        "name": run.cks[(m, s)].name,
        "sha256": run.sha[f"{m}/seed{s}"],
        "published": run.published[f"{m}/seed{s}"],
        "min_clean": cfg.serve_min_clean,
        "clean": clean[(m, s)],
        "eligible": [f"{k[0]}/seed{k[1]}" for k in eligible],
    }


def full_split_rest(run: Run) -> None:
    """For --full-split methods and the model chosen to serve: the white-box cascade at the largest ε on the test images outside the white-box sample."""
    cfg = run.cfg
    rest = run.order[len(run.samples["white-box"]) :]
    served = run.extras.get("served", {}).get("key")
    keys = [(m, s) for m in cfg.full_split if m in cfg.methods for s in cfg.seeds_of(m)]
    if served:
        m, s = served.split("/seed")
        keys = list(dict.fromkeys([*keys, (m, int(s))]))
    for m, s in keys:
        ck = run.cks[(m, s)]
        fkey = {"checkpoint": run.sha[f"{m}/seed{s}"], "rest": rest, **run.budgets, "eps": cfg.eps[-1]}
        run.rests[(m, s)] = outcome_from(
            run.cache.run(
                f"full split/{m}-seed{s}",
                fkey,
                lambda ck=ck: outcome_data(
                    _full_split_rest(run.suite, ck, run.x_all[rest], run.y_all[rest], cfg.eps[-1])
                ),
            )
        )


def coded_studies(run: Run) -> None:
    """On the first coded model: the EOT convergence curve, the N sweep and the co-tenant probe."""
    cfg, suite, cache, pool = run.cfg, run.suite, run.cache, run.pool
    if "coded" not in cfg.methods:
        return
    first = run.first["coded"]
    ck, o = run.cks[("coded", first)], run.outcomes[("coded", first)]
    ckey = {"checkpoint": run.sha[f"coded/seed{first}"], "draws": cfg.draws}
    eps_curve = min(cfg.eps, key=lambda e: abs(o["request"][f"{e:g}"].accuracy - 0.5))
    xc, yc = run.xs["eot-curve"], run.ys["eot-curve"]
    rows = cache.run(
        "eot curve/coded",
        {**ckey, "sample": run.samples["eot-curve"], "eps": eps_curve, "grid": cfg.eot_grid(), "seed": suite.seed},
        lambda: eot_curve(cfg, ck, xc, yc, pool, eps_curve, suite.seed),
    )
    run.extras["eot_curve"] = {
        "eps": eps_curve,
        "images": len(xc),
        "sample": "eot-curve",
        "model": ck.name,
        "rows": rows,
    }
    plain0 = o["plain"][f"{cfg.eps[0]:g}"]
    run.extras["n_sweep"] = cache.run(
        "n sweep/coded",
        {
            **ckey,
            "sample": run.samples["eot-curve"],
            "plain": run.stage_keys[f"coded/seed{first}"],
            **run.eot_budget,
            "eps": cfg.eps[0],
        },
        lambda: n_sweep(cfg, suite, ck, xc, yc, pool, plain0, cfg.eps[0]),
    )
    run.extras["n_sweep"]["sample"] = "eot-curve"
    run.extras["cotenant"] = cache.run(
        "cotenant/coded",
        {**ckey, "sample": run.samples["cotenant"], "steps": cfg.cotenant_steps},
        lambda: cotenant_table(cfg, ck, run.xs["cotenant"], run.ys["cotenant"], pool),
    )


def attacks_over_http(run: Run) -> None:
    """Last of the attacks (the longest stages): over HTTP; they join the worst cases before the checks and tests read them."""
    cfg = run.cfg
    if not run.attacked:
        return
    firsts = {m: run.cks[(m, cfg.seeds_of(m)[0])] for m in run.attacked}
    surrogates = {
        m: [
            (f"{sm} seed {ss}", run.cks[(sm, ss)])
            for sm, ss in dict.fromkeys([(m, cfg.surrogate_seed), ("erm", cfg.surrogate_seed)])
            if (sm, ss) != (m, cfg.seeds_of(m)[0])
        ]
        for m in firsts
    }
    bkey = {"sample": run.samples["black-box"], "draws": cfg.draws}
    bsha = {
        **{m: run.sha[f"{m}/seed{cfg.seeds_of(m)[0]}"] for m in firsts},
        **{f"{sm} seed {ss}": run.sha[f"{sm}/seed{ss}"] for sm, ss in run.surrogate_keys},
    }
    section, merges = blackbox_section(
        cfg,
        run.suite,
        run.cache,
        firsts,
        surrogates,
        run.xs["black-box"],
        run.ys["black-box"],
        run.x_all,
        run.y_all,
        run.pool,
        bkey,
        bsha,
    )
    n = len(run.samples["black-box"])
    for row in section[
        "rows"
    ]:  # what the white-box worst case was on the same images, before the black-box attacks join it
        if row["server"] in ("plain", "request"):
            row["whitebox_accuracy"] = float(
                run.outcomes[(row["method"], cfg.seeds_of(row["method"])[0])][row["server"]][run.last].score[:n].mean()
            )
    for (m, setting), found in merges.items():
        if setting not in ("plain", "request"):
            continue
        target = run.outcomes[(m, cfg.seeds_of(m)[0])][setting][run.last]
        idx = torch.arange(n)
        for label, x_adv, correct in found:
            target.merge(idx, x_adv, correct)
            target.log.append((f"{label} (first {n})", target.accuracy))
    run.extras["blackbox"] = section


def full_split(run: Run) -> None:
    """The sample's worst case (black-box attacks included) with the rest of the test split."""
    if not run.rests:
        return
    rows = {}
    for (m, s), rest_part in run.rests.items():
        sample_part = run.outcomes[(m, s)]["plain"][run.last]
        whole = Outcome(
            torch.cat([sample_part.x_adv, rest_part.x_adv]), torch.cat([sample_part.correct, rest_part.correct], 1)
        )
        rows[f"{m}/seed{s}"] = {
            **summary(whole),
            "sample_accuracy": sample_part.accuracy,
            "rest_accuracy": rest_part.accuracy,
            "rest_cascade": rest_part.log,
        }
    run.extras["full_split"] = {"eps": run.cfg.eps[-1], "n": len(run.order), "rows": rows}


def training_sizes(run: Run) -> None:
    cfg, cache = run.cfg, run.cache
    if cfg.sizes and cfg.size_methods:
        t1 = time.monotonic()
        run.extras["sizes"] = size_study(cfg, run.suite, cache, run.data, run.order)
        computed = sum(
            v for n, v in cache.seconds.items() if n.startswith("size/") and n not in cache.reused
        )  # counted under its own stage kind
        run.clock.add("training-set sizes: training (or reuse), clean accuracy", t1 + computed)


def checks(run: Run) -> None:
    """The sanity checks (cached: they attack again) and the paired tests."""
    cfg = run.cfg
    skey = {
        "models": run.stage_keys,
        "samples": run.samples,
        **run.budgets,
        **run.eot_budget,
        "blackbox": digest(run.extras.get("blackbox", {}).get("rows", [])),
        "budgets": cfg.budgets,
        "adversarial_budgets": cfg.adversarial_budgets,
    }
    run.extras["sanity"] = run.cache.run(
        "sanity",
        skey,
        lambda: sanity_checks(
            cfg, run.suite, run.outcomes, run.cks, run.xs, run.ys, run.pool, run.extras.get("blackbox")
        ),
    )
    run.extras["paired"] = [row.to_dict() for row in paired_tests(run.outcomes, cfg)]


def default_checkpoint(run: Run) -> None:
    """The shipped checkpoint on the whole test split, and which of the report's models it is."""
    cfg = run.cfg
    if cfg.data != "mnist":
        return
    shipped = checkpoint_record(default_checkpoint_path())["model.safetensors"]["sha256"]
    d = run.cache.run(
        "default checkpoint",
        {"draws": cfg.draws, "checkpoint": shipped},
        lambda: default_checkpoint_accuracy(run.x_all, run.y_all, run.pool, cfg.draws),
    )
    d["sha256"] = shipped
    d["same_as"] = next((k for k, v in run.sha.items() if v == shipped), None)
    run.extras["default_checkpoint"] = d


STAGES: tuple[Callable[[Run], None], ...] = (
    train_models,
    draw_samples,
    attack_models,
    choose_served,
    full_split_rest,
    coded_studies,
    attacks_over_http,
    full_split,
    training_sizes,
    checks,
    default_checkpoint,
)


def results_of(run: Run, command: str) -> dict:
    """The results file: the run's settings and environment, the samples, the checkpoints, every model's numbers and the stages' sections."""
    cfg, data = run.cfg, run.data
    models = {}
    for (m, s), o in run.outcomes.items():
        ck = run.cks[(m, s)]
        models[f"{m}/seed{s}"] = {
            "name": ck.name,
            "clean_full": _clean_full(ck, run.x_all, run.y_all),
            "settings": {setting: {e: summary(v) for e, v in o[setting].items()} for setting in ("plain", *SCOPES)},
        }
        if "curve" in o:
            models[f"{m}/seed{s}"]["curve_extra"] = {e: summary(v) for e, v in o["curve"].items()}
            models[f"{m}/seed{s}"]["curve_examples"] = {e: v.x_adv[:10].tolist() for e, v in o["curve"].items()}
    served = next(iter(run.cks.values())).coding_spec(scope="request")
    return {
        "config": dataclasses.asdict(cfg),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),  # when these numbers were measured
        "quick": cfg.quick,
        "seconds": run.clock.total,
        "stages": {**run.clock.stages, **stage_minutes(run.cache.seconds)},
        "reused_stages": len(run.cache.reused),
        "training_seconds": run.trained,
        "samples": {name: [int(i) for i in idx] for name, idx in run.samples.items()},
        "sample_classes": {
            name: {str(c): n for c, n in class_counts(data.test_y, idx).items()} for name, idx in run.samples.items()
        },
        "test_split": {
            "n": len(run.y_all),
            "classes": {str(c): n for c, n in class_counts(data.test_y, range(len(run.y_all))).items()},
        },
        "checkpoints": {
            k: {
                "files": run.records[k],
                "published": run.published[k],
                "training": run.training[k],
                "training_environment": run.training[k].get("environment"),
            }
            for k in run.records
        },  # None: written before checkpoints recorded it
        "coding": {
            "k": served.k,
            "n": served.n,
        },  # RCI as the models are served (K - 1 filler items per one-item request)
        "environment": {**environment(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "models": models,
        **run.extras,
    }


def write(out: Path, results: dict | None = None) -> Path:
    """The results file (first: the text can be re-rendered from it), then the markdown and figures; with no
    ``results``, the markdown and figures again from the results file beside ``out``."""
    if results is None:
        results = json.loads(out.with_suffix(".json").read_text())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.write_text(render(results, write_figures(results, out)))
    return out


def run_report(cfg: ReportConfig, command: str) -> Path:
    if cfg.render_only:
        return write(Path(cfg.out))
    cfg = cfg.for_data().resolved()
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, Path(cfg.out), cfg.suite(), StageCache(cfg.runs), Clock(), load_dataset(cfg.data))
    if cfg.train_only:
        train_models(run)
        for size in cfg.sizes:
            for seed in cfg.size_seeds:
                for m in cfg.size_methods:
                    ensure_checkpoint(cfg, m, seed, run.data, size)
        return Path(cfg.runs)
    for stage in STAGES:
        stage(run)
    return write(run.out, results_of(run, command))


def _full_split_rest(suite: SuiteConfig, ck, x, y, eps: float) -> Outcome:
    """The white-box cascade at ``eps`` from the clean images (the test images outside the white-box sample)."""
    plain_model, plain_scorer = attacker_and_scorer(ck, ck.coding_spec(enabled=False), None, 1, suite.seed)
    return run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, plain_scorer.start(x, y))


def _clean_full(ck, x, y) -> dict:
    return {"correct": int(clean_correct(ck, x, y).sum()), "n": len(x)}
