"""Adversarial training's examples: the settings resolved by data shape and the attacks against the current weights.

``pgd-at`` is Madry et al. (2018): every step trains on L∞ PGD examples (random start, signed
gradient steps, projection onto the ε-ball ∩ [0, 1]) made against the current weights, with
cross-entropy on the adversarial batch only. The examples are made in train mode, the mode the
weights are then updated in (as Madry et al.'s training code does: one graph, one mode), so
BatchNorm normalises with batch statistics both when attacking and when training; its running
statistics are frozen while the attack runs, so only the training forward pass updates them.
One deviation by default: ε (and the step size with it) ramps up linearly over the first
``at_warmup`` = 30 % of the training steps. Short runs of small models at a constant ε = 0.3
can collapse to a constant prediction (a width-8 digits CNN, 3 epochs at ε = 0.1, did in one
seed of three; a width-8 CNN on 4,000 MNIST images at ε = 0.3 stayed at chance for 6 epochs);
with the 30 % ramp none of five digits seeds did. ``at_warmup=0`` gives Madry et al.'s constant ε.

``coded-at`` trains on the same PGD examples as ``pgd-at``. ``trades`` (Zhang et al. 2019) makes
its examples by PGD on the KL divergence KL(f(x) ‖ f(x')) from the clean probabilities f(x),
fixed during the attack, starting at x + 0.001·N(0, 1) as the TRADES reference code does; ε, the
steps, the step size, the warm-up and the mode (train, BatchNorm statistics frozen) are those of
``pgd-at`` (the reference attacks in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codedsmooth.core.attacks import pgd, pgd_step_size

TRADES_START_STD = 0.001  # the TRADES reference code's start: x + 0.001·N(0, 1)


def adversarial_training_settings(cfg, input_shape: tuple[int, ...]) -> dict:
    """The training attack's ε, steps and step size from a ``TrainConfig``'s ``at_*`` fields, the ``None`` ones resolved by data shape.

    These are pgd-at's and coded-at's: cross-entropy maximised from a uniform start in the ball;
    a method attacking otherwise (trades: the KL divergence from a Gaussian start) overrides the
    start and the loss in its objective's ``attack_settings``."""
    mnist_like = tuple(input_shape) == (1, 28, 28)
    eps = cfg.at_eps if cfg.at_eps is not None else (0.3 if mnist_like else 8 / 255)
    step_size = cfg.at_step_size if cfg.at_step_size is not None else pgd_step_size(eps, cfg.at_steps)
    return {
        "eps": eps,
        "steps": cfg.at_steps,
        "step_size": step_size,
        "warmup": cfg.at_warmup,
        "random_start": True,
        "loss": "ce",
        "attack_mode": "train",
    }


class FrozenBatchNormStats:
    """Within the block, BatchNorm layers still normalise with batch statistics (train mode) but
    do not update their running mean/variance."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [
            (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in self.layers
        ]
        for m in self.layers:
            m.momentum = 0.0  # running = (1 − 0) · running + 0 · batch
        return self

    def __exit__(self, *exc):
        for m, (momentum, tracked) in zip(self.layers, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class _Attacking(FrozenBatchNormStats):
    """While attacking: BatchNorm statistics frozen and the weights out of autograd (only ∇ₓ is needed)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.model = model

    def __enter__(self):
        super().__enter__()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return super().__exit__(*exc)


def warmup_scale(at: dict, progress: float) -> float:
    """The factor on ε and the step size when ``progress`` of the training steps are done: progress / warmup, at most 1."""
    return min(1.0, progress / at["warmup"]) if at["warmup"] > 0 else 1.0


def pgd_examples(model, xb, yb, at: dict, generator: torch.Generator, progress: float = 1.0) -> torch.Tensor:
    """Madry et al.'s training attack against the current weights, in train mode.

    ``progress`` is the fraction of training done; during the warm-up ε and the step size
    scale by progress / warmup."""
    scale = warmup_scale(at, progress)
    if scale <= 0:
        return xb
    with _Attacking(model):
        return pgd(
            model,
            xb,
            yb,
            scale * at["eps"],
            steps=at["steps"],
            step_size=scale * at["step_size"],
            random_start=True,
            generator=generator,
        )


def kl_per_item(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) = Σ_j p_j (log p_j − log q_j) per item (0 · log 0 = 0)."""
    return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(1)


def trades_examples(model, xb, yb, at: dict, generator: torch.Generator, progress: float = 1.0) -> torch.Tensor:
    """TRADES's training attack (Zhang et al. 2019): PGD on KL(f(x) ‖ f(x')) within the ε-ball, in train mode.

    The clean probabilities f(x) are computed once and fixed; the first iterate is
    x + 0.001·N(0, 1) (drawn from ``generator``); ε and the step size follow the warm-up as in
    :func:`pgd_examples`. ``yb`` only marks which points count as misclassified (unused by plain PGD)."""
    scale = warmup_scale(at, progress)
    if scale <= 0:
        return xb
    with _Attacking(model):
        with torch.no_grad():
            p_clean = F.softmax(model(xb), dim=1)
        start = xb + TRADES_START_STD * torch.randn(xb.shape, generator=generator).to(xb)
        return pgd(
            model,
            xb,
            yb,
            scale * at["eps"],
            steps=at["steps"],
            step_size=scale * at["step_size"],
            loss=lambda logits, _y: kl_per_item(p_clean, logits),
            start=start,
        )
