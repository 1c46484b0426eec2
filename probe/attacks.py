"""The attacks of ``codedsmooth attack``, one class each, and their registry.

Each class says what it needs of the target (``gradients`` of the attacker's copy, ``queries`` to the
target, or ``batch-mates`` in the server's micro-batch), the threat models it runs under, and
``craft()``. :data:`ATTACKS` maps the CLI's names to the classes; the options' choices, the checks of an
attack/threat pair and the sanity checks that apply all come from the class, so a new attack is one
class here and one line in :data:`ATTACKS` (as torchattacks keeps one class per attack).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import apgd, fgsm, pgd
from codedsmooth.models import Checkpoint

from .rays import confirmed_rays, rays_attack
from .servers import query_attack
from .suite import SuiteConfig, rci_stage, whitebox_stage
from .targets import RCIModel

Need = Literal["gradients", "queries", "labels", "batch-mates"]
THREATS = ("transfer", "adaptive", "blackbox")
GRADIENT_THREATS: tuple[str, ...] = ("transfer", "adaptive")


class Attack:
    """One attack run against ``target`` (the served function, in-process or over HTTP) with the attacker's copy ``ck``.

    ``craft(x, y, eps)`` returns adversarial inputs in the ε-ball; ``extras`` is what the attack adds to the
    JSON report (per ε, e.g. its queries per image).
    """

    needs: ClassVar[Need]
    threats: ClassVar[tuple[str, ...]]
    why: ClassVar[str] = ""  # said when a threat outside ``threats`` is asked for
    iterative: ClassVar[bool] = False  # sanity check: at least as strong as one FGSM step
    per_eps: ClassVar[bool] = True  # False: no ε-ball (its report is its own)

    def __init__(self, cfg: AttackConfig, ck: Checkpoint, target, clean_pool, threat: str | None = None):
        self.cfg, self.ck, self.target, self.pool = cfg, ck, target, clean_pool
        self.threat = threat or cfg.threat
        self.extras: dict[str, Any] = {}

    @classmethod
    def check_threat(cls, name: str, threat: str) -> None:
        if threat not in cls.threats:
            raise ValueError(
                f"attack {name!r} needs {cls.needs}: use threat {' or '.join(repr(t) for t in cls.threats)}"
                + (f" ({cls.why})" if cls.why else "")
            )

    def craft(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The whole report of an attack without an ε-ball (``per_eps`` False)."""
        raise NotImplementedError

    def fixed_craft(self, model_fn, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor | None:
        """The same attack on a deterministic ``model_fn`` (the identity-permutation check); None: not a gradient attack."""
        return None

    @property
    def spec(self) -> CodingSpec:
        return self.target.spec

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed)


class GradientAttack(Attack):
    """Gradients of the attacker's copy: the plain model (transfer) or the RCI model (adaptive)."""

    needs = "gradients"
    threats = GRADIENT_THREATS
    why = "or a query attack such as 'square' for 'blackbox'"

    def surrogate(self) -> RCIModel:
        """The model the attacker differentiates: the plain model (transfer) or the RCI model (adaptive)."""
        if self.threat == "transfer" or not self.spec.enabled:
            return RCIModel(self.ck, CodingSpec.plain())
        return RCIModel(self.ck, self.spec, self.pool, seed=self.cfg.seed + 1)

    @property
    def eot(self) -> int:
        """RCI draws averaged per gradient."""
        return 1

    def step(self, model_fn, x, y, eps: float, eot: int) -> torch.Tensor:
        raise NotImplementedError

    def craft(self, x, y, eps):
        return self.step(self.surrogate(), x, y, eps, self.eot)

    def fixed_craft(self, model_fn, x, y, eps):
        return self.step(model_fn, x, y, eps, 1)


class FGSM(GradientAttack):
    """One signed-gradient step; with the adaptive threat, its gradient averaged over RCI draws (EOT)."""

    @property
    def eot(self) -> int:
        return self.cfg.eot_samples if self.threat == "adaptive" else 1

    def step(self, model_fn, x, y, eps, eot):
        return fgsm(model_fn, x, y, eps, eot_samples=eot)


class PGD(GradientAttack):
    """PGD-CE for ``--steps`` steps, one RCI draw per gradient."""

    iterative = True

    def step(self, model_fn, x, y, eps, eot):
        return pgd(model_fn, x, y, eps, steps=self.cfg.steps, eot_samples=eot, generator=self.generator())


class EOTPGD(PGD):
    """PGD-CE with each gradient averaged over ``--eot-samples`` draws of RCI."""

    threats = ("adaptive",)
    why = "it averages over RCI's randomness: it is the 'adaptive' threat"

    @property
    def eot(self) -> int:
        return self.cfg.eot_samples


class Cascade(GradientAttack):
    """The report's own stages at one ε: the white-box cascade (APGD-CE, APGD-DLR, PGD-CE with restarts) on the
    model without RCI; with the adaptive threat against RCI, then the report's RCI cascade (that worst case
    transferred, EOT-APGD-CE and -DLR through RCI). ``--steps`` steps each, ``--eot-samples`` draws per gradient."""

    iterative = True

    def craft(self, x, y, eps):
        cfg = self.cfg
        suite = SuiteConfig(
            apgd_steps=cfg.steps,
            pgd_steps=cfg.steps,
            pgd_restarts=cfg.restarts,
            eot_draws=cfg.eot_samples,
            eot_steps=cfg.steps,
            seed=cfg.seed,
        )
        plain = whitebox_stage(suite, self.ck, x, y, [eps])
        if self.threat != "adaptive" or not self.spec.enabled:
            return plain[f"{eps:g}"].x_adv
        return rci_stage(suite, self.ck, self.spec, x, y, self.pool, plain, [eps], cfg.draws)[f"{eps:g}"].x_adv

    def step(self, model_fn, x, y, eps, eot):  # the identity check: its first attack, APGD-CE
        return apgd(model_fn, x, y, eps, steps=self.cfg.steps, loss="ce", eot=eot, generator=self.generator())


@dataclass
class QueryOutcome:
    """A query-only attack's result per image: the adversarial input, the queries it cost, and whether its break was confirmed."""

    x_adv: torch.Tensor
    queries: torch.Tensor
    broken: torch.Tensor


class Square(Attack):
    """The adaptive Square on probabilities only (robust statistic over repeated queries, re-queried incumbent,
    confirmed breaks, every query counted)."""

    needs = "queries"
    threats = ("blackbox",)
    why = "it is the black-box attack"
    access: ClassVar[str] = "scores"

    @staticmethod
    def query_only(
        target, x: torch.Tensor, y: torch.Tensor, eps: float, budget: int, votes: int, confirm: int, seed: int
    ) -> QueryOutcome:
        """The attack as ``codedsmooth audit`` runs it on any endpoint: ``votes`` queries per candidate."""
        res = query_attack(target, x, y, eps, budget, votes, confirm, seed)
        return QueryOutcome(res["x_adv"], res["queries"], res["broken"])

    def craft(self, x, y, eps):
        cfg = self.cfg
        res = query_attack(self.target, x, y, eps, cfg.queries, cfg.score_queries, cfg.confirm, cfg.seed)
        q = res["queries"].double()
        self.extras.setdefault("queries_per_image", {})[f"{eps:g}"] = {
            "median": float(q.median()),
            "p90": float(torch.quantile(q, 0.9)),
            "confirmed_broken": int(res["broken"].sum()),
        }
        return res["x_adv"]


class RayS(Attack):
    """RayS (Chen & Gu 2020): label-only ray search over sign directions; a label is the majority of ``--score-queries`` answers."""

    needs = "labels"
    threats = ("blackbox",)
    why = "it reads labels only"
    access: ClassVar[str] = "labels"

    @staticmethod
    def query_only(
        target, x: torch.Tensor, y: torch.Tensor, eps: float, budget: int, votes: int, confirm: int, seed: int
    ) -> QueryOutcome:
        """The attack as ``codedsmooth audit`` runs it: labels only (majority of ``votes``), then ``confirm`` fresh queries."""
        x_adv, used, broken = confirmed_rays(
            lambda z: target.predict_proba(z).argmax(1), x, y, eps, budget, votes=votes, confirm=confirm
        )
        return QueryOutcome(x_adv, used, broken)

    def craft(self, x, y, eps):
        return rays_attack(
            lambda z: self.target.predict_proba(z).argmax(1), x, y, eps, self.cfg.queries, votes=self.cfg.score_queries
        )[0]


class Cotenant(Attack):
    """An attacker's request shares the victim's micro-batch and optimises its items to flip the victim's label."""

    needs = "batch-mates"
    threats = THREATS
    per_eps = False

    def run(self, x, y) -> dict:
        from .cotenant import cotenant_report

        return cotenant_report(self.cfg, self.ck, self.spec, self.target, x, y, self.pool)


ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "cascade": Cascade,
    "eot-pgd": EOTPGD,
    "square": Square,
    "rays": RayS,
    "cotenant": Cotenant,
}
DEPRECATED = {"apgd": "cascade"}  # old name -> name; accepted with a warning for one release


def attack_name(name: str) -> str:
    """The registry's name for ``name``: a deprecated alias is accepted with a warning."""
    if name in DEPRECATED:
        new = DEPRECATED[name]
        warnings.warn(
            f"attack {name!r} is deprecated and will be removed in the next release: use {new!r} (the same attack)",
            FutureWarning,
            stacklevel=3,
        )
        return new
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {list(ATTACKS)}")
    return name


def _threat_help() -> str:
    return (
        "transfer: gradients of the model without RCI; adaptive: gradients through RCI (EOT for eot-pgd and fgsm; cascade: the report's RCI cascade); "
        "blackbox: queries only. " + "; ".join(f"{n}: {', '.join(c.threats)}" for n, c in ATTACKS.items())
    )


@dataclass
class AttackConfig:
    """One attack run; ``codedsmooth attack`` takes its options and defaults from these fields."""

    attack: str = field(
        default="pgd",
        metadata={"help": "attack (apgd: deprecated name of cascade)", "choices": (*ATTACKS, *DEPRECATED)},
    )
    threat: str = field(default="adaptive", metadata={"help": _threat_help(), "choices": THREATS})
    eps: list[float] = field(
        default_factory=lambda: [0.1], metadata={"help": "L∞ radius in pixel units [0, 1]; several values for a sweep"}
    )
    steps: int = field(default=20, metadata={"help": "PGD and APGD steps; co-tenant optimisation steps"})
    restarts: int = field(
        default=1, metadata={"help": "cascade: random restarts of the PGD-CE step of the report's cascade"}
    )
    eot_samples: int = field(default=8, metadata={"help": "RCI draws averaged per gradient in EOT"})
    samples: int = field(default=200, metadata={"help": "test items attacked"})
    queries: int = field(default=1000, metadata={"help": "black-box: query budget per item (every query counts)"})
    score_queries: int = field(
        default=2,
        metadata={
            "help": "black-box: queries per candidate; the attack keeps their maximum margin (robust to one-sided noise)"
        },
    )
    confirm: int = field(
        default=4,
        metadata={"help": "black-box: fresh queries that must all misclassify before an item counts as broken"},
    )
    draws: int = field(
        default=32,
        metadata={
            "help": "a randomized target (RCI, input noise) is scored on this many draws per item: expected accuracy"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    sanity: bool = field(
        default=True,
        metadata={
            "help": "run the sanity checks (identity permutation, iterative <= one step, large eps; thresholds shared with the report)"
        },
    )

    def __post_init__(self) -> None:
        if self.attack in DEPRECATED:
            self.attack = attack_name(self.attack)

    @property
    def attack_class(self) -> type[Attack]:
        return ATTACKS[attack_name(self.attack)]

    def validate(self) -> None:
        cls = self.attack_class
        if self.threat not in THREATS:
            raise ValueError(f"unknown threat {self.threat!r}; known: {list(THREATS)}")
        cls.check_threat(self.attack, self.threat)
        if any(e < 0 or e > 1 for e in self.eps):
            raise ValueError(f"eps values must lie in [0, 1] (pixels are in [0, 1]), got {self.eps}")
        counts = {
            "samples": self.samples,
            "steps": self.steps,
            "restarts": self.restarts,
            "eot_samples": self.eot_samples,
            "queries": self.queries,
            "score_queries": self.score_queries,
            "confirm": self.confirm,
            "draws": self.draws,
        }
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad:
            raise ValueError(f"these must be positive: {bad}")
