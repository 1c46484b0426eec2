"""The training-set-size study: what coded training adds to erm (clean accuracy) and to pgd-at (clean and
worst-case accuracy) when the training set is small.

Every method is trained on nested class-stratified subsets of the training split
(``train.data.training_subset``), with about as many optimiser steps at every size
(:func:`.training.checkpoint_plan`), for several seeds. Each model is scored without RCI on the whole
test split (clean) and, if adversarially trained, by the white-box cascade at the report's largest ε
on a class-stratified sample (worst case). A pair of methods is compared per size and seed by an
exact McNemar test on the same images; :data:`PAIRS` says which pairs and on what.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from codedsmooth.models import load_checkpoint
from codedsmooth.models.config import ADVERSARIAL_METHODS
from codedsmooth.train import as_float
from codedsmooth.train.data import training_subset

from ..cache import StageCache
from ..samples import class_counts
from ..stats import mcnemar, paired_difference
from ..suite import SuiteConfig, whitebox_stage
from ..weights import checkpoint_record
from .config import ReportConfig
from .stages import outcome_data, outcome_from, plain_predictions, summary
from .training import ensure_checkpoint, training_seconds

log = logging.getLogger("codedsmooth.report")

# (A, B, measure): coded training against the same training without the coded loss.
PAIRS = (
    ("coded", "erm", "clean"),
    ("coded", "mixup", "clean"),
    ("coded-at", "pgd-at", "clean"),
    ("coded-at", "pgd-at", "worst"),
    ("coded-fast-at", "fast-at", "clean"),
    ("coded-fast-at", "fast-at", "worst"),
)


def bits(correct: torch.Tensor) -> str:
    """Per-image outcomes as a string of 0 and 1 (compact in the results file; an auditor re-runs the tests from it)."""
    return "".join("1" if c else "0" for c in correct.bool().tolist())


def unbits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def size_study(cfg: ReportConfig, suite: SuiteConfig, cache: StageCache, data, order: torch.Tensor) -> dict:
    """Train (or reuse) every model of the study, score it, and run the paired tests."""
    n_train = len(data.train_y)
    too_big = [s for s in cfg.sizes if s > n_train]
    if too_big:
        raise ValueError(f"--sizes {too_big} exceed the training split's {n_train} items")
    classes = len(data.classes)
    sample = order[: cfg.size_per_class * classes]
    eps = cfg.eps[-1]
    x_all, y_all = as_float(data.test_x), data.test_y
    budgets = {
        "apgd": cfg.apgd_steps,
        "pgd": cfg.pgd_steps,
        "restarts": cfg.pgd_restarts,
        "seed": suite.seed,
        "eps": eps,
    }
    plan = [(size, seed, m) for size in cfg.sizes for seed in cfg.size_seeds for m in cfg.size_methods]
    rows = []
    bar = tqdm(plan, desc="training-set sizes", disable=None)
    for size, seed, m in bar:
        bar.set_postfix_str(f"{m} on {size}, seed {seed}")
        path = ensure_checkpoint(cfg, m, seed, data, size)
        ck = load_checkpoint(path)
        record = checkpoint_record(path)
        predictions = plain_predictions(ck, x_all)
        clean = predictions == y_all
        t = ck.config.training.model_dump()  # ensure_checkpoint checked it against the study's plan
        row = {
            "size": size,
            "method": m,
            "seed": seed,
            "epochs": t["epochs"],
            "steps": t["epochs"] * -(-size // t["batch_size"]),
            "sha256": record["model.safetensors"]["sha256"],
            "training_seconds": training_seconds(path),
            "clean": {
                "correct": int(clean.sum()),
                "n": len(clean),
                "per_image": bits(clean),
                "classes_predicted": len(predictions.unique()),
            },
        }
        if m in ADVERSARIAL_METHODS:
            key = {"checkpoint": row["sha256"], "sample": sample, **budgets}
            worst = outcome_from(
                cache.run(
                    f"size/{m}-n{size}-seed{seed}",
                    key,
                    lambda ck=ck: outcome_data(
                        whitebox_stage(suite, ck, x_all[sample], y_all[sample], [eps])[f"{eps:g}"]
                    ),
                )
            )
            s = summary(worst)
            row["worst"] = {
                "accuracy": s["accuracy"],
                "interval": s["interval"],
                "n": s["n"],
                "per_image": bits(worst.correct[0]),
                "cascade": s["cascade"],
            }
        rows.append(row)
    return {
        "eps": eps,
        "n_train": n_train,
        "seeds": list(cfg.size_seeds),
        "methods": list(cfg.size_methods),
        "sizes": list(cfg.sizes),
        "sample": [int(i) for i in sample],
        "sample_classes": {str(c): n for c, n in class_counts(data.test_y, sample).items()},
        "subset_classes": {
            str(size): {str(c): n for c, n in class_counts(training_subset(data, size).train_y, range(size)).items()}
            for size in cfg.sizes
        },
        "rows": rows,
        "tests": size_tests(rows),
    }


def collapsed(row: dict, classes: int) -> bool:
    """A model that predicts fewer than half of the classes on the test split: its training failed, it did not learn less."""
    return row["clean"].get("classes_predicted", classes) < classes / 2


def size_tests(rows: list[dict]) -> list[dict]:
    """Exact McNemar tests of each pair in :data:`PAIRS`, per size and seed, on the per-image outcomes of the rows."""
    by = {(r["size"], r["method"], r["seed"]): r for r in rows}
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for a, b, measure in PAIRS:
            tests = []
            for seed in dict.fromkeys(r["seed"] for r in rows):
                ra, rb = by.get((size, a, seed)), by.get((size, b, seed))
                if not (ra and rb and measure in ra and measure in rb):
                    continue
                ca, cb = unbits(ra[measure]["per_image"]), unbits(rb[measure]["per_image"])
                t = mcnemar(ca, cb)
                tests.append(
                    {
                        "seed": seed,
                        "diff": float(ca.float().mean() - cb.float().mean()),
                        "only_a": t.only_a,
                        "only_b": t.only_b,
                        "p": t.p_value,
                        "n": len(ca),
                    }
                )
            if tests:
                pooled = paired_difference(
                    sum(t["only_a"] for t in tests), sum(t["only_b"] for t in tests), sum(t["n"] for t in tests)
                )  # every seed's pairs of images together: the size of the difference, with its interval
                out.append(
                    {
                        "size": size,
                        "a": a,
                        "b": b,
                        "measure": measure,
                        "tests": tests,
                        "pooled": {"diff": pooled.diff, "low": pooled.low, "high": pooled.high, "n": pooled.n},
                    }
                )
    return out
