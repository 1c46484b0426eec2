"""The training methods, one ``Objective`` class each, registered by ``Method`` in ``OBJECTIVES``.

An objective is one batch's training loss as a module (DDP synchronises the gradients of what
runs through its forward). A class says what it needs from the trainer: ``uses_code`` asks for
the coded block (``mu``, the N schedule) and ``attack_settings`` for the training attack's ε,
steps and step size (the ``at_*`` options). Its forward makes the batch it trains on
(``examples``: the clean one, or one made against the current weights) and takes its loss on it
(``loss``), so a variant is a subclass that swaps one of the two: ``coded-at`` is ``pgd-at``'s
examples with ``coded``'s loss. A new method is one class here plus one line in ``OBJECTIVES``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codedsmooth.core import CodedSmoothing
from codedsmooth.models import Method

from .adversarial import TRADES_START_STD, adversarial_training_settings, kl_per_item, pgd_examples, trades_examples


class Objective(nn.Module):
    """ERM: cross-entropy on the clean batch. The base of every method."""

    uses_code: ClassVar[bool] = False  # trains the coded block (mu, the N schedule)
    checks_collapse: ClassVar[bool] = (
        False  # checked for catastrophic overfitting after every epoch (train.overfitting)
    )

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        trunk: nn.Module,
        coded: CodedSmoothing | None,
        at: dict | None,
        generator: torch.Generator,
        at_generator: torch.Generator,
    ):
        super().__init__()
        self.cfg, self.model, self.trunk, self.coded, self.at = cfg, model, trunk, coded, at
        self.gen, self.at_gen = generator, at_generator

    @classmethod
    def attack_settings(cls, cfg: Any, input_shape: tuple[int, ...]) -> dict | None:
        """The training attack's settings (the checkpoint's ``adversarial_training``); None: trains on clean inputs."""
        return None

    def recorded(self) -> dict[str, Any]:
        """Hyper-parameters of this method for the checkpoint's ``training`` record, beyond the common ones."""
        return {}

    def examples(self, xb: torch.Tensor, yb: torch.Tensor, progress: float) -> torch.Tensor:
        """The batch to train on; ``progress`` is the fraction of training done (the ε warm-up)."""
        return xb

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, coded loss) on the batch ``examples`` made."""
        return F.cross_entropy(self.model(xb), yb), xb.new_zeros(())

    def forward(self, xb: torch.Tensor, yb: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.examples(xb, yb, progress), yb)


class Mixup(Objective):
    """mixup (Zhang et al. 2018): one λ ~ Beta(α, α) per batch mixes it with a permutation of itself."""

    def __init__(self, cfg: Any, *args: Any):
        super().__init__(cfg, *args)
        self.beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha)

    def recorded(self) -> dict[str, Any]:
        return {"mixup_alpha": self.cfg.mixup_alpha}

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(self.beta.sample())
        perm = torch.randperm(len(xb), generator=self.gen).to(xb.device)
        logits = self.model(lam * xb + (1 - lam) * xb[perm])
        return lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm]), xb.new_zeros(())


class Coded(Objective):
    """coded-smoothing: cross-entropy plus ``mu`` × the coded loss of the block on the batch."""

    uses_code = True

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.coded is not None
        logits, closs = self.coded(self.trunk(xb))
        return F.cross_entropy(logits, yb) + closs, closs


class PgdAt(Objective):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples against the current weights."""

    @classmethod
    def attack_settings(cls, cfg: Any, input_shape: tuple[int, ...]) -> dict | None:
        return adversarial_training_settings(cfg, input_shape)

    def examples(self, xb: torch.Tensor, yb: torch.Tensor, progress: float) -> torch.Tensor:
        assert self.at is not None
        return pgd_examples(self.model, xb, yb, self.at, self.at_gen, progress)


class CodedAt(PgdAt, Coded):
    """coded-at: the coded loss (of ``coded``) on the adversarial batch (of ``pgd-at``)."""


class Trades(PgdAt):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β · mean KL(f(x) ‖ f(x')), the gradient through both."""

    @classmethod
    def attack_settings(cls, cfg: Any, input_shape: tuple[int, ...]) -> dict | None:
        return {
            **adversarial_training_settings(cfg, input_shape),
            "random_start": f"normal(0, {TRADES_START_STD})",
            "loss": "kl",
        }

    def recorded(self) -> dict[str, Any]:
        return {"trades_beta": self.cfg.trades_beta}

    def forward(self, xb: torch.Tensor, yb: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.at is not None
        x_adv = trades_examples(self.model, xb, yb, self.at, self.at_gen, progress)
        logits = self.model(xb)
        robust = kl_per_item(F.softmax(logits, dim=1), self.model(x_adv)).mean()
        return F.cross_entropy(logits, yb) + self.cfg.trades_beta * robust, xb.new_zeros(())


class FastAt(PgdAt):
    """Fast adversarial training (Wong, Rice and Kolter 2020): one FGSM step of 1.25 ε (``--at-step-size``) from a uniform random start, ε ramped up by ``--at-warmup``."""

    checks_collapse = True

    @classmethod
    def attack_settings(cls, cfg: Any, input_shape: tuple[int, ...]) -> dict | None:
        at = adversarial_training_settings(cfg, input_shape)
        return {**at, "steps": 1, "step_size": cfg.at_step_size if cfg.at_step_size is not None else 1.25 * at["eps"]}


class CodedFastAt(FastAt, Coded):
    """coded-fast-at: the coded loss (of ``coded``) on fast-at's FGSM batch."""


OBJECTIVES: dict[Method, type[Objective]] = {
    "erm": Objective,
    "mixup": Mixup,
    "coded": Coded,
    "pgd-at": PgdAt,
    "coded-at": CodedAt,
    "trades": Trades,
    "fast-at": FastAt,
    "coded-fast-at": CodedFastAt,
}
