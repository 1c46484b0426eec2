"""The report's black-box section: query and transfer attacks over HTTP against each method's model served
plain, with RCI (request scope) and with input noise at RCI's clean accuracy, all of them models of one
repository server (:func:`.servers.repository_server`).

Per method (its first seed's model): σ of the noise baseline from a grid by measured clean
accuracy; the adaptive Square at every budget (and, for the study, at other numbers of queries per
candidate); white-box APGD on surrogates the attacker trained itself (another seed of the same
method, and an ERM model), one query per image. Every attack's inputs are scored on draws of the
served function, like the rest of the report, and each row keeps its per-image scores and queries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack

import torch

from codedsmooth.models import Checkpoint

from ..cache import StageCache
from ..servers import BLACKBOX_SERVERS, one_query, query_attack, repository_server, served_function, target_name
from ..stats import sign_test, wilson
from ..suite import Scorer, SuiteConfig
from ..targets import HttpTarget
from .config import ReportConfig
from .results import BlackBoxRow
from .stages import noise_calibration, transfer_source

log = logging.getLogger("codedsmooth.report")

# What a row's queries ran against (``served_by``, also in each stage's cache key): one repository server for
# every method and setting. Results files written before carry no mark (``render`` reads that as one server each).
REPOSITORY = "repository"


def _quantile(q: torch.Tensor, p: float) -> float:
    return float(torch.quantile(q.double(), p)) if len(q) else float("nan")


def _row(
    method: str,
    model: str,
    attacker: str,
    budget: int,
    score_queries: int | None,
    setting: str,
    correct: torch.Tensor,
    queries: torch.Tensor,
    extra: dict,
) -> dict:
    """One row of the section (a :class:`.results.BlackBoxRow`, as the results file holds it)."""
    score = correct.float().mean(0)
    n = len(score)
    acc = float(score.mean())
    ci = wilson(int(round(acc * n)), n)
    broken = score < 1
    return BlackBoxRow(
        method=method,
        model=model,
        attacker=attacker,
        budget=budget,
        score_queries=score_queries,
        server=setting,
        accuracy=acc,
        interval=(ci.low, ci.high),
        n=n,
        draws=int(correct.shape[0]),
        majority=[bool(v) for v in (score > 0.5)],
        score=[round(float(s), 4) for s in score],
        queries=[int(v) for v in queries],
        queries_median=_quantile(queries, 0.5),
        queries_p90=_quantile(queries, 0.9),
        queries_mean=float(queries.double().mean()),
        queries_median_broken=_quantile(queries[broken], 0.5) if bool(broken.any()) else None,
        extra=extra,
    ).to_dict()


def blackbox_section(
    cfg: ReportConfig,
    suite: SuiteConfig,
    cache: StageCache,
    models: dict[str, Checkpoint],
    surrogates: dict[str, list[tuple[str, Checkpoint]]],
    x,
    y,
    x_all,
    y_all,
    pool,
    key: dict,
    sha: dict[str, str],
) -> tuple[dict, dict]:
    """Run (or reuse) every black-box attack; returns the results' section and, per (method, setting),
    the scored adversarials [(label, x_adv, correct)] to merge into the white-box worst case.

    ``key``: what every stage here depends on (the sample, the draws); ``sha``: the SHA-256 of each
    target's (by method) and surrogate's (by label) weights, so a stage's key names only its own models."""
    eps = cfg.eps[-1]
    rows, merges, noise = [], {}, {}
    for method, ck in models.items():
        noise[method] = cache.run(
            f"noise calibration/{method}",
            {"checkpoint": sha[method], "grid": cfg.noise_grid, "draws": cfg.calibration_draws, "seed": suite.seed},
            lambda ck=ck: noise_calibration(cfg, ck, x_all, y_all, pool, suite.seed),
        )
    with ExitStack() as stack:
        server: list[
            Callable[[str], HttpTarget]
        ] = []  # the repository server, started when the first stage that is not cached needs it

        def target(method, setting):
            if not server:
                server.append(
                    stack.enter_context(
                        repository_server(
                            {
                                target_name(m, s): (models[m], s, noise[m]["sigma"])
                                for m in models
                                for s in BLACKBOX_SERVERS
                            }
                        )
                    )
                )
            return server[0](target_name(method, setting))

        for method, ck in models.items():
            rows_of, merges_of = _attack_model(
                cfg,
                suite,
                cache,
                method,
                ck,
                surrogates.get(method, []),
                noise[method]["sigma"],
                x,
                y,
                pool,
                key,
                sha,
                lambda setting, method=method: target(method, setting),
            )
            rows += rows_of
            merges.update(merges_of)
    section = {
        "eps": eps,
        "images": len(x),
        "score_queries": cfg.score_queries,
        "confirm": cfg.confirm,
        "budgets": list(cfg.budgets),
        "budgets_by_method": {m: list(cfg.budgets_of(m)) for m in models},
        "servers": dict(BLACKBOX_SERVERS),
        "noise": noise,
        "rows": rows,
        "paired": paired_servers(rows),
    }
    return section, merges


def _attack_model(
    cfg: ReportConfig,
    suite: SuiteConfig,
    cache: StageCache,
    method: str,
    ck: Checkpoint,
    surrogates: list[tuple[str, Checkpoint]],
    sigma: float,
    x,
    y,
    pool,
    key: dict,
    sha: dict[str, str],
    target,
) -> tuple[list[dict], dict]:
    """Every attack over HTTP on one method's model in each setting; ``target(setting)`` is its HTTP target."""
    eps = cfg.eps[-1]
    mkey = {**key, "checkpoint": sha[method]}
    rows: list[dict] = []
    merges: dict[tuple[str, str], list] = {}
    sources = {}
    for label, sck in surrogates:
        sources[label] = cache.run(
            f"transfer source/{method}/{label}",
            {**key, "surrogate": sha[label], "eps": eps, "steps": suite.apgd_steps, "seed": suite.seed},
            lambda sck=sck: transfer_source(suite, sck, x, y, eps),
        )
    jobs = [("adaptive Square", b, cfg.score_queries) for b in cfg.budgets_of(method)]
    if method in cfg.study_methods:
        jobs += [
            ("adaptive Square", cfg.study_budget, m)
            for m in cfg.study_score_queries
            if m != cfg.score_queries or cfg.study_budget not in cfg.budgets_of(method)
        ]
    for setting in BLACKBOX_SERVERS:
        skey = {**mkey, "setting": setting, "sigma": sigma if setting == "noise" else None, "served_by": REPOSITORY}
        served = Scorer(served_function(ck, setting, sigma, pool, suite.seed), cfg.draws)
        clean = cache.run(
            f"black-box clean/{method}/{setting}", skey, lambda setting=setting: one_query(target(setting), x, y)
        )
        clean_draws = served(x, y)
        extra_clean = {
            "served_by": REPOSITORY,
            "served_clean_one_query": float(clean["served_correct"].float().mean()),
            "clean_expected": float(clean_draws.float().mean()),
            "sigma": sigma if setting == "noise" else None,
        }
        for attacker, budget, m in jobs:
            if setting == "plain" and m != cfg.score_queries:
                continue  # the plain server answers the same to every query: more queries per candidate only cost
            res = cache.run(
                f"black-box/{method}/{setting}/square-{budget}-m{m}",
                {**skey, "eps": eps, "budget": budget, "m": m, "confirm": cfg.confirm, "seed": suite.seed},
                lambda setting=setting, budget=budget, m=m: query_attack(
                    target(setting), x, y, eps, budget, m, cfg.confirm, suite.seed
                ),
            )
            correct = served(res["x_adv"], y)
            rows.append(
                _row(
                    method,
                    ck.name,
                    attacker,
                    budget,
                    m,
                    setting,
                    correct,
                    res["queries"],
                    {
                        **extra_clean,
                        "confirmed_broken": int(res["broken"].sum()),
                        "queries_sent": int(res["queries_sent"]),
                        "seconds": float(res["seconds"]),
                    },
                )
            )
            if m == cfg.score_queries:
                merges.setdefault((method, setting), []).append(
                    (f"adaptive Square {budget} q, HTTP", res["x_adv"], correct)
                )
        for label, x_t in sources.items():
            res = cache.run(
                f"black-box/{method}/{setting}/transfer-{label}",
                {**skey, "source": sha[label], "eps": eps, "x": x_t},
                lambda setting=setting, x_t=x_t: one_query(target(setting), x_t, y),
            )
            correct = served(x_t, y)
            rows.append(
                _row(
                    method,
                    ck.name,
                    f"transfer from {label}",
                    1,
                    None,
                    setting,
                    correct,
                    res["queries"],
                    {
                        **extra_clean,
                        "served_correct_one_query": float(res["served_correct"].float().mean()),
                        "seconds": float(res["seconds"]),
                    },
                )
            )
            merges.setdefault((method, setting), []).append((f"transfer from {label}, HTTP", x_t, correct))
    return rows, merges


def paired_servers(rows: list[dict]) -> list[dict]:
    """Each randomized server against the plain one, per method, attacker and budget: an exact sign test on the
    same images' expected accuracies (images the server scores higher against images the plain one does)."""
    out = []
    plain = {(r["method"], r["attacker"], r["budget"], r["score_queries"]): r for r in rows if r["server"] == "plain"}
    for r in rows:
        if r["server"] == "plain":
            continue
        base = plain.get((r["method"], r["attacker"], r["budget"], r["score_queries"]))
        if base is None:
            continue
        t = sign_test(torch.tensor(r["score"]), torch.tensor(base["score"]))
        out.append(
            {
                "method": r["method"],
                "attacker": r["attacker"],
                "budget": r["budget"],
                "score_queries": r["score_queries"],
                "server": r["server"],
                "diff": r["accuracy"] - base["accuracy"],
                "only_server": t.only_a,
                "only_plain": t.only_b,
                "p": t.p_value,
            }
        )
    return out
