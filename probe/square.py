"""The score-based Square attack (Andriushchenko et al. 2020): queries a score function, no gradients.

No I/O of its own: ``score_fn`` may query a server (``probe.targets.HttpTarget``). The
gradient attacks (FGSM, PGD, APGD) are in ``codedsmooth.core.attacks``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s_y − max_{j≠y} s_j of scores ``probs`` (probabilities, log-probabilities or logits): negative once misclassified."""
    true = probs.gather(1, y[:, None]).squeeze(1)
    other = probs.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return true - other.max(1).values


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def square_p_init(image_shape: tuple[int, ...]) -> float:
    """Default initial square area fraction by image size: 0.8 up to 32×32 (the reference's
    setting for MNIST and CIFAR-10), 0.05 above (its ImageNet setting)."""
    h, w = image_shape[-2:]
    return 0.8 if h * w <= 32 * 32 else 0.05


def square_attack(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 200,
    p_init: float | None = None,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    *,
    scores: str = "probs",
    rescale_schedule: bool = True,
    redraw: bool = True,
    reference_windows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-based L∞ Square attack (Andriushchenko et al. 2020) within a query budget.

    ``score_fn(x)`` returns probabilities (``scores="probs"``, as the HTTP target does) or
    logits (``scores="logits"``); the attack minimises the margin of log-probabilities
    (log p_y − max_{j≠y} log p_j) or of logits, as the reference does. Against a randomized
    target each candidate is queried ``repeats`` times and the scores averaged.

    As in the reference: vertical ±ε stripes to start; then each step sets one random square
    window of every unfooled image to a random ±ε per channel, keeping it when the margin drops.
    With ``redraw`` (the reference's behaviour) a window that would not change the image is
    redrawn before it is queried; ART's SquareAttack does not redraw and so spends some of its
    queries on unchanged images (on 1-channel images a large share of them late in the schedule).
    A window may start anywhere it fits; ``reference_windows`` draws its corner from [0, H − s)
    as the reference code and ART do (numpy's exclusive upper bound), so no window after the
    stripes ever touches the last row or column. Both reference behaviours weaken the attack: on
    the 8×8 digits (ERM CNN, ε = 0.1, 300 queries) they left 65 % accuracy where the defaults
    left 55 %; with both switched on this function agrees with ART's SquareAttack. The window's area is p·H·W with p from the
    reference's piecewise-constant schedule over the iteration index, rescaled to the budget
    (``rescale_schedule``, as the reference does; False keeps its 10,000-iteration scale).
    ``p_init=None`` picks it by image size (:func:`square_p_init`). An image stops as soon as its
    margin is negative. Returns (x_adv, queries used per image); no image uses more than ``queries``.
    """
    if scores not in ("probs", "logits"):
        raise ValueError(f"scores must be probs or logits, got {scores!r}")
    n, c, h, w = x.shape
    gen = generator or torch.Generator().manual_seed(0)
    p_init = square_p_init(x.shape) if p_init is None else p_init
    x = x.detach()

    def loss(batch, labels):
        s = torch.stack([score_fn(batch).detach().float() for _ in range(repeats)]).mean(0)
        return margin(_log_probs(s) if scores == "probs" else s, labels)

    def rand_signs(*shape):
        return (torch.randint(0, 2, shape, generator=gen).float() * 2 - 1).to(x.device, x.dtype)

    x_best = (x + eps * rand_signs(n, c, 1, w)).clamp(0.0, 1.0)
    m_best = loss(x_best, y)
    used = torch.full((n,), repeats, dtype=torch.long)
    iterations = max(0, queries // repeats - 1)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    for i in range(iterations):
        active = (m_best > 0).nonzero().flatten()
        if len(active) == 0:
            break
        p = _square_fraction(p_init, i, iterations if rescale_schedule else 10000)
        side = max(1, min(h - 1, int(round(math.sqrt(p * h * w)))))
        xa, xb = x[active], x_best[active]
        candidate = xb.clone()
        redo = torch.ones(len(active), dtype=torch.bool, device=x.device)
        for _ in range(100 if redraw else 1):  # the reference redraws until the window changes the image
            m = int(redo.sum())
            r = torch.randint(0, max(1, h - side) if reference_windows else h - side + 1, (m,), generator=gen).to(x.device)
            s = torch.randint(0, max(1, w - side) if reference_windows else w - side + 1, (m,), generator=gen).to(x.device)
            in_rows = (rows[None] >= r[:, None]) & (rows[None] < r[:, None] + side)
            in_cols = (cols[None] >= s[:, None]) & (cols[None] < s[:, None] + side)
            mask = (in_rows[:, None, :, None] & in_cols[:, None, None, :]).expand(m, c, h, w)
            window = (xa[redo] + eps * rand_signs(m, c, 1, 1)).clamp(0.0, 1.0)
            candidate[redo] = torch.where(mask, window, xb[redo])
            same = ((candidate[redo] - xb[redo]).abs() < 1e-7).flatten(1).all(1)
            redo_idx = redo.nonzero().flatten()
            redo = torch.zeros_like(redo)
            redo[redo_idx[same]] = True
            if not bool(redo.any()):
                break
        m_new = loss(candidate, y[active])
        used[active.cpu()] += repeats
        better = m_new < m_best[active]
        x_best[active[better]] = candidate[better]
        m_best[active[better]] = m_new[better]
    return x_best, used


def _square_fraction(p_init: float, step: int, total: int) -> float:
    """The reference's piecewise-constant schedule of the square's area, over ``total`` iterations."""
    progress = int(step * 10000 / max(total, 1))
    for bound, factor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
        if progress <= bound:
            return p_init / factor
    return p_init / 512
