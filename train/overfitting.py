"""The check for catastrophic overfitting of single-step adversarial training, run after every epoch.

FGSM training (Wong, Rice and Kolter 2020) can suddenly fit its own attack: within an epoch the
model becomes robust to the FGSM examples it trains on while PGD accuracy falls to about zero,
and it does not recover. Wong et al. detect this on a fixed batch and keep the weights from
before. Here, after every epoch, PGD (10 steps, random start) and the training attack itself
(FGSM from a random start, the training step size) attack a fixed class-balanced batch held out
of training (taken from the test split, since the check only compares the run with itself) at the
full ε, in eval mode, with the same random starts each epoch. An epoch is good while its PGD
accuracy is within ``drop`` (0.2, Wong et al.'s threshold) of the best so far. It has collapsed
when its PGD accuracy is below that and its FGSM accuracy rose over the previous epoch's (a model
that gets worse under both attacks is diverging, not overfitting to its attack, and trains on);
training then restores the last good epoch's weights and stops there (Wong et al.'s early
stopping), and the collapse is logged and written to the history.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from codedsmooth.core.attacks import pgd, pgd_step_size

CHECK_SIZE = 200  # items in the held-out batch: 20 per class on the 10-class data sets
PGD_STEPS = 10
DROP = 0.2


@dataclass(frozen=True)
class RobustnessCheck:
    """One epoch's accuracies on the held-out batch under PGD and under the training attack (FGSM)."""

    pgd_accuracy: float
    fgsm_accuracy: float


def held_out_batch(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` items of (x, y), class-balanced, from a seeded permutation of each class."""
    gen = torch.Generator().manual_seed(seed)
    classes = sorted(set(y.tolist()))
    per_class = max(1, math.ceil(size / len(classes)))
    picks = [(y == c).nonzero().flatten() for c in classes]
    chosen = torch.cat([p[torch.randperm(len(p), generator=gen)[:per_class]] for p in picks])[:size]
    return x[chosen], y[chosen]


class CollapseGuard:
    """Measures the held-out batch after each epoch, remembers the last good weights and says when to restore them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, at: dict, seed: int, drop: float = DROP):
        self.model, self.x, self.y = model, x, y
        self.eps, self.fgsm_step = at["eps"], at["step_size"]
        self.seed, self.drop = seed, drop
        self.best_pgd = -math.inf
        self.last: RobustnessCheck | None = None  # the previous epoch's check
        self.good_epoch = 0  # 0: the weights training started from
        self.good_state = copy.deepcopy(model.state_dict())

    def measure(self) -> RobustnessCheck:
        was_training = self.model.training
        self.model.eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            gen = torch.Generator().manual_seed(self.seed)  # the same starts every epoch
            x_pgd = pgd(
                self.model,
                self.x,
                self.y,
                self.eps,
                steps=PGD_STEPS,
                step_size=pgd_step_size(self.eps, PGD_STEPS),
                random_start=True,
                generator=gen,
            )
            x_fgsm = pgd(
                self.model,
                self.x,
                self.y,
                self.eps,
                steps=1,
                step_size=self.fgsm_step,
                random_start=True,
                generator=gen,
            )
            with torch.no_grad():
                acc = [float((self.model(xa).argmax(1) == self.y).float().mean()) for xa in (x_pgd, x_fgsm)]
        finally:
            for p in params:
                p.requires_grad_(True)
            self.model.train(was_training)
        return RobustnessCheck(acc[0], acc[1])

    def after_epoch(self, epoch: int) -> tuple[RobustnessCheck, bool]:
        """(this epoch's check, whether it collapsed); a good epoch's weights become the ones to restore."""
        check = self.measure()
        self.best_pgd = max(self.best_pgd, check.pgd_accuracy)
        low = check.pgd_accuracy < self.best_pgd - self.drop
        collapsed = low and self.last is not None and check.fgsm_accuracy > self.last.fgsm_accuracy
        if not low:
            self.good_epoch = epoch
            self.good_state = copy.deepcopy(self.model.state_dict())
        self.last = check
        return check, collapsed

    def restore(self) -> int:
        """Load the last good epoch's weights; returns that epoch (0: the starting weights)."""
        self.model.load_state_dict(self.good_state)
        return self.good_epoch
