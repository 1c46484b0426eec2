"""The report's paired McNemar tests on per-image worst cases, as typed results (:class:`.results.PairedTest`)."""

from __future__ import annotations

from codedsmooth.core import SCOPES

from ..stats import mcnemar
from .config import ReportConfig, method_pairs
from .results import PLAIN, PairedTest, SeedTest


def _test(seed: int, diff: float, a, b) -> SeedTest:
    t = mcnemar(a, b)
    return SeedTest(seed, diff, t.only_a, t.only_b, t.p_value)


def paired_tests(outcomes: dict, cfg: ReportConfig) -> list[PairedTest]:
    """McNemar on per-image worst-case outcomes: methods against each other (no RCI, the seeds both have), RCI on vs off (per method, every seed)."""
    rows = []
    methods = [m for m in cfg.methods if any(k[0] == m for k in outcomes)]
    for eps in (f"{e:g}" for e in cfg.eps):
        for a, b in method_pairs(methods):
            tests = []
            for seed in (s for s in cfg.seeds_of(a) if s in cfg.seeds_of(b)):
                oa, ob = outcomes[(a, seed)][PLAIN][eps], outcomes[(b, seed)][PLAIN][eps]
                tests.append(_test(seed, oa.accuracy - ob.accuracy, oa.majority(), ob.majority()))
            rows.append(PairedTest(a, PLAIN, b, PLAIN, eps, tuple(tests)))
        for m in methods:
            for scope in SCOPES:
                tests = []
                for seed in cfg.seeds_of(m):
                    o = outcomes[(m, seed)]
                    on = o[scope][eps]
                    off_majority = o[PLAIN][eps].majority()[: on.correct.shape[1]]
                    off_acc = float(off_majority.float().mean())
                    tests.append(
                        _test(seed, float(on.majority().float().mean()) - off_acc, on.majority(), off_majority)
                    )
                rows.append(PairedTest(m, scope, m, PLAIN, eps, tuple(tests)))
    return rows
