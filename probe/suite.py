"""The report's attack suite: per image, the worst case over a cascade of attacks.

As in AutoAttack (Croce & Hein 2020), each attack runs only on the images that
every earlier attack left (partly) correct, and each image keeps the adversarial
input that did it the most harm. A larger ε starts from the smaller ε's result
(that input is inside the larger ball too), so accuracy cannot rise with ε.

Outcomes are per image *and per draw*: a plain model is one deterministic draw;
a randomized (RCI) model is scored on ``draws`` independent draws of its
randomness, drawn by an evaluator whose source the attacker never sees. An
image's score is the share of draws it is classified correctly; the worst case
keeps, per image, the adversarial with the lowest score; expected accuracy is
the mean score, and its spread the standard deviation over draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import apgd, pgd
from codedsmooth.models import Checkpoint

from .targets import RCIModel

Attack = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]  # (x, y, indices into the image set) -> x_adv


@torch.no_grad()
def correct_draws(model: RCIModel, x: torch.Tensor, y: torch.Tensor, draws: int, batch_size: int = 256) -> torch.Tensor:
    """(draws, n) bool: image i classified correctly in draw d."""
    rows = []
    for _ in range(draws):
        parts = [model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)]
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool))
    return torch.stack(rows)


@dataclass
class Outcome:
    """Per image: the most harmful input found so far and its correctness in every draw."""

    x_adv: torch.Tensor
    correct: torch.Tensor  # (draws, n) bool
    log: list[tuple[str, float]] = field(default_factory=list)  # (attack, expected accuracy after it)

    @property
    def score(self) -> torch.Tensor:
        """(n,) share of draws classified correctly."""
        return self.correct.float().mean(0)

    @property
    def accuracy(self) -> float:
        return float(self.score.mean()) if self.correct.numel() else float("nan")

    @property
    def draw_sd(self) -> float:
        """Standard deviation over draws of the accuracy (0 for a deterministic model)."""
        per_draw = self.correct.float().mean(1)
        return float(per_draw.std(unbiased=True)) if len(per_draw) > 1 else 0.0

    @property
    def alive(self) -> torch.Tensor:
        """Indices of images correct in at least one draw (what the next attack works on)."""
        return (self.score > 0).nonzero().flatten()

    def majority(self) -> torch.Tensor:
        """(n,) bool: correct in more than half of the draws (the binary outcome paired tests use)."""
        return self.score > 0.5

    def copy(self) -> Outcome:
        return Outcome(self.x_adv.clone(), self.correct.clone(), list(self.log))

    def merge(self, idx: torch.Tensor, x_new: torch.Tensor, correct_new: torch.Tensor) -> None:
        """Per image in ``idx``, keep ``x_new`` where it scores lower."""
        better = correct_new.float().mean(0) < self.score[idx]
        take = idx[better]
        self.x_adv[take] = x_new[better]
        self.correct[:, take] = correct_new[:, better]


class Scorer:
    """Scores inputs on a fixed number of draws of the evaluated model (the served function)."""

    def __init__(self, model: RCIModel, draws: int):
        self.model = model
        self.draws = draws if model.randomized else 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return correct_draws(self.model, x, y, self.draws)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> Outcome:
        out = Outcome(x.clone(), self(x, y))
        out.log.append(("clean", out.accuracy))
        return out


def run_cascade(
    attacks: list[tuple[str, Attack]], scorer: Scorer, x: torch.Tensor, y: torch.Tensor, start: Outcome, progress=None
) -> Outcome:
    """Each attack on the images still alive; per image the worst result is kept."""
    out = start.copy()
    out.log = [("start", start.accuracy)]
    for name, attack in attacks:
        idx = out.alive
        if len(idx):
            x_new = attack(x[idx], y[idx], idx).detach()
            out.merge(idx, x_new, scorer(x_new, y[idx]))
        out.log.append((name, out.accuracy))
        if progress is not None:
            progress(name, out.accuracy)
    return out


@dataclass
class SuiteConfig:
    """Budgets of the attacks (the defaults are the report's full setting)."""

    apgd_steps: int = 100
    pgd_steps: int = 100
    pgd_restarts: int = 5
    eot_draws: int = 8
    eot_steps: int = 100
    seed: int = 0


def whitebox_attacks(model_fn, eps: float, cfg: SuiteConfig) -> list[tuple[str, Attack]]:
    """APGD-CE, APGD-DLR and PGD-CE with restarts, on a deterministic model."""

    def gen():
        return torch.Generator().manual_seed(cfg.seed)

    return [
        (
            f"APGD-CE {cfg.apgd_steps}",
            lambda x, y, idx: apgd(model_fn, x, y, eps, steps=cfg.apgd_steps, loss="ce", generator=gen()),
        ),
        (
            f"APGD-DLR {cfg.apgd_steps}",
            lambda x, y, idx: apgd(model_fn, x, y, eps, steps=cfg.apgd_steps, loss="dlr", generator=gen()),
        ),
        (
            f"PGD-CE {cfg.pgd_steps}×{cfg.pgd_restarts}",
            lambda x, y, idx: pgd(model_fn, x, y, eps, steps=cfg.pgd_steps, restarts=cfg.pgd_restarts, generator=gen()),
        ),
    ]


def eot_attacks(
    model_fn, eps: float, cfg: SuiteConfig, draws: int | None = None, steps: int | None = None
) -> list[tuple[str, Attack]]:
    """APGD-CE and APGD-DLR with gradients, losses and logits averaged over draws of RCI (EOT)."""
    draws, steps = draws or cfg.eot_draws, steps or cfg.eot_steps

    def gen():
        return torch.Generator().manual_seed(cfg.seed + 7)

    return [
        (
            f"EOT-APGD-CE {steps}×{draws}",
            lambda x, y, idx: apgd(model_fn, x, y, eps, steps=steps, loss="ce", eot=draws, generator=gen()),
        ),
        (
            f"EOT-APGD-DLR {steps}×{draws}",
            lambda x, y, idx: apgd(model_fn, x, y, eps, steps=steps, loss="dlr", eot=draws, generator=gen()),
        ),
    ]


def transfer_attack(name: str, source: Outcome) -> tuple[str, Attack]:
    """The adversarials found in another setting for the same images (e.g. the plain model's, sent through RCI)."""
    return name, lambda x, y, idx: source.x_adv[idx]


def served_model(
    ck: Checkpoint, spec: CodingSpec, pool: torch.Tensor | None, seed: int, noise_sigma: float = 0.0
) -> RCIModel:
    """The served function (RCI per ``spec``, input noise of ``noise_sigma``) with the evaluator's own randomness."""
    return RCIModel(ck, spec, pool, seed=2000 + seed, noise_sigma=noise_sigma)


def attacker_and_scorer(
    ck: Checkpoint, spec: CodingSpec, pool: torch.Tensor | None, draws: int, seed: int
) -> tuple[RCIModel, Scorer]:
    """The attacker's differentiable model and the served function it is scored on, with independent randomness."""
    attacker = RCIModel(ck, spec, pool, seed=1000 + seed) if spec.enabled else RCIModel(ck, spec)
    served = served_model(ck, spec, pool, seed) if spec.enabled else attacker
    return attacker, Scorer(served, draws)


def whitebox_stage(suite: SuiteConfig, ck: Checkpoint, x, y, eps_list: list[float]) -> dict[str, Outcome]:
    """No RCI: the white-box cascade at every ε (a larger ε starts from the smaller one's worst case)."""
    plain_model, plain_scorer = attacker_and_scorer(ck, CodingSpec.plain(), None, 1, suite.seed)
    current = plain_scorer.start(x, y)
    out = {}
    for eps in eps_list:
        current = run_cascade(whitebox_attacks(plain_model, eps, suite), plain_scorer, x, y, current)
        out[f"{eps:g}"] = current
    return out


def rci_stage(
    suite: SuiteConfig,
    ck: Checkpoint,
    spec: CodingSpec,
    x,
    y,
    pool,
    plain: dict[str, Outcome],
    eps_list: list[float],
    draws: int,
) -> dict[str, Outcome]:
    """Through RCI (``spec``): the no-RCI worst case transferred, then EOT-APGD through the attacker's model of the server."""
    attacker, scorer = attacker_and_scorer(ck, spec, pool, draws, suite.seed)
    current = scorer.start(x, y)
    out = {}
    for eps in eps_list:
        source = plain[f"{eps:g}"]
        sub = Outcome(source.x_adv[: len(x)], source.correct[:, : len(x)])
        attacks = [transfer_attack("transfer from no-RCI worst case", sub), *eot_attacks(attacker, eps, suite)]
        current = run_cascade(attacks, scorer, x, y, current)
        out[f"{eps:g}"] = current
    return out
