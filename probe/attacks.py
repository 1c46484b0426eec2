"""Attack math on differentiable (possibly randomized) models: FGSM, PGD, EOT-PGD, Square.

``model_fn(x) -> logits`` may draw fresh randomness on every call (RCI); EOT
averages the input gradient over ``eot_samples`` calls. Inputs are raw pixels
in [0, 1] and every attack stays in the L∞ ball of radius ``eps`` and in [0, 1].
No I/O: the Square attack takes a score function, which may query a server.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def input_gradient(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eot_samples: int = 1) -> torch.Tensor:
    """∇ₓ of the summed cross-entropy, averaged over ``eot_samples`` calls of ``model_fn``."""
    x = x.detach().requires_grad_(True)
    total = torch.zeros_like(x)
    with torch.enable_grad():  # attacks may be called from inside no_grad/eval code
        for _ in range(eot_samples):
            loss = F.cross_entropy(model_fn(x), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            total += grad
    return total / eot_samples


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def fgsm(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eps: float, eot_samples: int = 1) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al. 2015)."""
    grad = input_gradient(model_fn, x, y, eot_samples)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD (Madry et al. 2018); with ``eot_samples > 1`` it is EOT-PGD (Athalye et al. 2018)."""
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
        x_adv = project(x + eps * noise, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = input_gradient(model_fn, x_adv, y, eot_samples)
        x_adv = project(x_adv + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_y − max_{j≠y} p_j: negative once the item is misclassified."""
    true = probs.gather(1, y[:, None]).squeeze(1)
    other = probs.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return true - other.max(1).values


def square_attack(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 200,
    p_init: float = 0.3,
    repeats: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-based L∞ Square attack (Andriushchenko et al. 2020) within a query budget.

    ``score_fn(x) -> probabilities`` is queried ``repeats`` times per candidate and
    averaged, against a randomized target. Returns (x_adv, queries used per item).
    Items stop once their (averaged) margin is negative.
    """
    n, c, h, w = x.shape
    gen = generator or torch.Generator().manual_seed(0)

    def score(batch):
        return torch.stack([score_fn(batch) for _ in range(repeats)]).mean(0)

    # Start from vertical stripes of ±eps, as in the paper.
    stripes = eps * (torch.randint(0, 2, (n, c, 1, w), generator=gen).float() * 2 - 1)
    x_best = (x + stripes).clamp(0.0, 1.0)
    m_best = margin(score(x_best), y)
    used = torch.full((n,), repeats, dtype=torch.long)
    budget_steps = max(0, queries // repeats - 1)
    for i in range(budget_steps):
        active = (m_best > 0).nonzero().flatten()
        if len(active) == 0:
            break
        p = _square_fraction(p_init, i, budget_steps)
        side = max(1, min(h - 1, int(round(math.sqrt(p * h * w)))))
        candidate = x_best[active].clone()
        for j in range(len(active)):
            r = int(torch.randint(0, h - side + 1, (1,), generator=gen))
            s = int(torch.randint(0, w - side + 1, (1,), generator=gen))
            signs = eps * (torch.randint(0, 2, (c, 1, 1), generator=gen).float() * 2 - 1)
            xa = x[active[j]]
            candidate[j, :, r : r + side, s : s + side] = (xa[:, r : r + side, s : s + side] + signs).clamp(0.0, 1.0)
        m_new = margin(score(candidate), y[active])
        used[active] += repeats
        better = m_new < m_best[active]
        x_best[active[better]] = candidate[better]
        m_best[active[better]] = m_new[better]
    return x_best, used


def _square_fraction(p_init: float, step: int, total: int) -> float:
    """The paper's piecewise-constant schedule of the square's area, rescaled to the budget."""
    progress = int(step * 10000 / max(total, 1))
    for bound, factor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
        if progress <= bound:
            return p_init / factor
    return p_init / 512
