"""PGD adversarial training's examples: the settings resolved by data shape and the attack against the current weights.

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
"""

from __future__ import annotations

import torch

from codedsmooth.core.attacks import pgd, pgd_step_size


def adversarial_training_settings(cfg, input_shape: tuple[int, ...]) -> dict:
    """pgd-at's ε, steps and step size from a ``TrainConfig``'s ``at_*`` fields, the ``None`` ones resolved by data shape."""
    mnist_like = tuple(input_shape) == (1, 28, 28)
    eps = cfg.at_eps if cfg.at_eps is not None else (0.3 if mnist_like else 8 / 255)
    step_size = cfg.at_step_size if cfg.at_step_size is not None else pgd_step_size(eps, cfg.at_steps)
    return {
        "eps": eps, "steps": cfg.at_steps, "step_size": step_size, "warmup": cfg.at_warmup,
        "random_start": True, "loss": "ce", "attack_mode": "train",
    }


class FrozenBatchNormStats:
    """Within the block, BatchNorm layers still normalise with batch statistics (train mode) but
    do not update their running mean/variance."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0  # running = (1 − 0) · running + 0 · batch
        return self

    def __exit__(self, *exc):
        for m, (momentum, tracked) in zip(self.layers, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def pgd_examples(model, xb, yb, at: dict, generator: torch.Generator, progress: float = 1.0) -> torch.Tensor:
    """Madry et al.'s training attack against the current weights, in train mode.

    ``progress`` is the fraction of training done; during the warm-up ε and the step size
    scale by progress / warmup."""
    scale = min(1.0, progress / at["warmup"]) if at["warmup"] > 0 else 1.0
    if scale <= 0:
        return xb
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # only ∇ₓ is needed while attacking
    try:
        with FrozenBatchNormStats(model):
            return pgd(model, xb, yb, scale * at["eps"], steps=at["steps"], step_size=scale * at["step_size"], random_start=True, generator=generator)
    finally:
        for p in params:
            p.requires_grad_(True)
