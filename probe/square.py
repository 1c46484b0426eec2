"""The score-based Square attack (Andriushchenko et al. 2020): queries a score function, no gradients.

``square_attack`` is Square as in its reference. ``adaptive_square_attack`` is the same search
made robust to randomized scores (a served model under RCI or input noise answers every query
with a fresh draw): it shares the reference's candidate windows and schedule and adds a robust
score per candidate, re-queries of the incumbent and a confirmation before an image counts as broken.

No I/O of its own: ``score_fn`` may query a server (``probe.targets.HttpTarget``). The
gradient attacks (FGSM, PGD, APGD) are in ``codedsmooth.core.attacks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

STATISTICS = ("max", "quantile", "mean")


def margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s_y − max_{j≠y} s_j of scores ``probs`` (probabilities, log-probabilities or logits): negative once misclassified."""
    true = probs.gather(1, y[:, None]).squeeze(1)
    other = probs.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return true - other.max(1).values


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _score_margin(s: torch.Tensor, y: torch.Tensor, scores: str) -> torch.Tensor:
    """The margin the attack minimises: of log-probabilities (``scores="probs"``) or of logits."""
    return margin(_log_probs(s) if scores == "probs" else s, y)


def _check_scores(scores: str) -> None:
    if scores not in ("probs", "logits"):
        raise ValueError(f"scores must be probs or logits, got {scores!r}")


def square_p_init(image_shape: tuple[int, ...]) -> float:
    """Default initial square area fraction by image size: 0.8 up to 32×32 (the reference's
    setting for MNIST and CIFAR-10), 0.05 above (its ImageNet setting)."""
    h, w = image_shape[-2:]
    return 0.8 if h * w <= 32 * 32 else 0.05


class _Windows:
    """The reference's candidates: vertical ±ε stripes to start, then one random square window
    per image set to a random ±ε per channel, its side from the schedule (one generator for all draws)."""

    def __init__(
        self,
        x: torch.Tensor,
        eps: float,
        p_init: float | None,
        generator: torch.Generator | None,
        redraw: bool,
        reference_windows: bool,
    ):
        self.x, self.eps = x, eps
        self.p_init = square_p_init(x.shape) if p_init is None else p_init
        self.gen = generator or torch.Generator().manual_seed(0)
        self.redraw, self.reference_windows = redraw, reference_windows
        _, _, h, w = x.shape
        self.rows = torch.arange(h, device=x.device)
        self.cols = torch.arange(w, device=x.device)

    def _signs(self, *shape) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=self.gen).float() * 2 - 1).to(self.x.device, self.x.dtype)

    def stripes(self) -> torch.Tensor:
        n, c, _, w = self.x.shape
        return (self.x + self.eps * self._signs(n, c, 1, w)).clamp(0.0, 1.0)

    def side(self, step: int, total: int) -> int:
        _, _, h, w = self.x.shape
        p = _square_fraction(self.p_init, step, total)
        return max(1, min(h - 1, int(round(math.sqrt(p * h * w)))))

    def candidates(self, active: torch.Tensor, x_best: torch.Tensor, side: int) -> torch.Tensor:
        """One window of side ``side`` drawn into each of ``x_best`` (the incumbents of images ``active``)."""
        _, c, h, w = self.x.shape
        rows, cols, eps, gen = self.rows, self.cols, self.eps, self.gen
        xa, xb = self.x[active], x_best
        candidate = xb.clone()
        redo = torch.ones(len(active), dtype=torch.bool, device=self.x.device)
        for _ in range(100 if self.redraw else 1):  # the reference redraws until the window changes the image
            m = int(redo.sum())
            r = torch.randint(0, max(1, h - side) if self.reference_windows else h - side + 1, (m,), generator=gen).to(
                self.x.device
            )
            s = torch.randint(0, max(1, w - side) if self.reference_windows else w - side + 1, (m,), generator=gen).to(
                self.x.device
            )
            in_rows = (rows[None] >= r[:, None]) & (rows[None] < r[:, None] + side)
            in_cols = (cols[None] >= s[:, None]) & (cols[None] < s[:, None] + side)
            mask = (in_rows[:, None, :, None] & in_cols[:, None, None, :]).expand(m, c, h, w)
            window = (xa[redo] + eps * self._signs(m, c, 1, 1)).clamp(0.0, 1.0)
            candidate[redo] = torch.where(mask, window, xb[redo])
            same = ((candidate[redo] - xb[redo]).abs() < 1e-7).flatten(1).all(1)
            redo_idx = redo.nonzero().flatten()
            redo = torch.zeros_like(redo)
            redo[redo_idx[same]] = True
            if not bool(redo.any()):
                break
        return candidate


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
    target each candidate is queried ``repeats`` times and the scores averaged; a randomized
    target is better attacked by :func:`adaptive_square_attack`.

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
    _check_scores(scores)
    n = len(x)
    x = x.detach()
    windows = _Windows(x, eps, p_init, generator, redraw, reference_windows)

    def loss(batch, labels):
        s = torch.stack([score_fn(batch).detach().float() for _ in range(repeats)]).mean(0)
        return _score_margin(s, labels, scores)

    x_best = windows.stripes()
    m_best = loss(x_best, y)
    used = torch.full((n,), repeats, dtype=torch.long)
    iterations = max(0, queries // repeats - 1)
    for i in range(iterations):
        active = (m_best > 0).nonzero().flatten()
        if len(active) == 0:
            break
        side = windows.side(i, iterations if rescale_schedule else 10000)
        candidate = windows.candidates(active, x_best[active], side)
        m_new = loss(candidate, y[active])
        used[active.cpu()] += repeats
        better = m_new < m_best[active]
        x_best[active[better]] = candidate[better]
        m_best[active[better]] = m_new[better]
    return x_best, used


@dataclass
class SquareResult:
    """What :func:`adaptive_square_attack` found: the adversarials, the queries each image used
    (every query it sent), and which images were confirmed misclassified."""

    x_adv: torch.Tensor
    queries: torch.Tensor  # LongTensor (n,)
    broken: torch.Tensor  # BoolTensor (n,)


def robust_statistic(readings: torch.Tensor, statistic: str = "max", quantile: float = 0.75) -> torch.Tensor:
    """One score per row of ``readings`` (n, m): its max, its ``quantile`` or its mean."""
    if statistic == "max":
        return readings.max(1).values
    if statistic == "quantile":
        return readings.quantile(quantile, dim=1)
    if statistic == "mean":
        return readings.mean(1)
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def adaptive_square_attack(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int,
    *,
    score_queries: int = 2,
    statistic: str = "max",
    requery_incumbent: bool = True,
    confirm: int = 4,
    p_init: float | None = None,
    generator: torch.Generator | None = None,
    scores: str = "probs",
    quantile: float = 0.75,
) -> SquareResult:
    """Square against a target whose every answer is a random draw, within ``queries`` per image.

    The candidates are :func:`square_attack`'s (same windows, same schedule, same generator); what
    changes is how they are judged. Every query scores one image once, as the margin of
    :func:`square_attack`; a *reading* is one such margin.

    - A candidate is scored by ``statistic`` over ``score_queries`` = m readings: ``"max"`` (the
      default: the noise of RCI is one-sided — a draw's margin is at most about the plain model's
      and some draws are far lower — so the max of m draws estimates the plain margin and a lucky
      low draw needs all m draws to be lucky), ``"quantile"`` (``quantile``, e.g. 0.75, of the m)
      or ``"mean"``.
    - With ``requery_incumbent`` the current best is queried once more every step, before it is
      compared, and its score is the same statistic over its m most recent readings (the new one
      and the m − 1 before it). So incumbent and candidate are judged by one estimator over the
      same number of draws, and a lucky low reading ages out after m steps instead of freezing the
      search. (Pooling all of the incumbent's readings would make "max" creep up with their number
      and let worse candidates replace it.)
    - An image whose score is ≤ 0 is confirmed: up to ``confirm`` = k fresh queries of it, stopped
      at the first that leaves the label on top. It counts as broken only if all k put another
      class on top; otherwise those readings join its incumbent's and the search goes on. The
      search keeps k queries in reserve, so a found adversarial can always be confirmed. With
      ``confirm=0`` an image stops once its score is ≤ 0 and counts as broken if it is < 0 (the
      search's own verdict, as :func:`square_attack` has it).
    - Every query — candidates, re-queries, confirmations — counts against ``queries``; an image
      stops when it is broken or its next step would not fit.

    Each step costs m + 1 (m without re-queries) queries, so the schedule of window sizes runs over
    (queries − m − k) // (m + 1) steps. On a deterministic target every reading of a point is
    the same and the attack is :func:`square_attack` at that many steps, plus the k confirmation
    queries. With ``score_queries=1, requery_incumbent=False, confirm=0`` it is
    :func:`square_attack` at the same budget: same candidates, same result, ``broken`` where its
    last margin is negative.
    """
    _check_scores(scores)
    robust_statistic(torch.zeros(1, 1), statistic, quantile)  # rejects an unknown statistic before any query
    m, r, k = int(score_queries), int(bool(requery_incumbent)), int(confirm)
    if m < 1 or k < 0:
        raise ValueError(f"score_queries must be ≥ 1 and confirm ≥ 0, got {m} and {k}")
    if queries < m:
        raise ValueError(f"a budget of {queries} queries cannot score even the start ({m} queries)")
    n = len(x)
    x = x.detach()
    y = y.to(x.device)
    windows = _Windows(x, eps, p_init, generator, redraw=True, reference_windows=False)

    def read(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Readings (len(images), times) for every (images, labels, times), from one call to ``score_fn``."""
        batch = torch.cat([images.repeat(t, 1, 1, 1) for images, _, t in parts])
        labels = torch.cat([labels.repeat(t) for _, labels, t in parts]).cpu()
        out = _score_margin(score_fn(batch).detach().float().cpu(), labels, scores)
        chunks = out.split([len(images) * t for images, _, t in parts])
        return [chunk.view(t, len(images)).T for chunk, (images, _, t) in zip(chunks, parts)]

    def push(idx: torch.Tensor, new: torch.Tensor) -> None:
        """Append readings ``new`` (len(idx), j) to the incumbents' histories, keeping the last m."""
        hist[idx] = torch.cat([hist[idx], new], 1)[:, -m:]

    x_best = windows.stripes()
    (hist,) = read([(x_best, y, m)])
    used = torch.full((n,), m, dtype=torch.long)
    broken = torch.zeros(n, dtype=torch.bool)
    live = torch.ones(n, dtype=torch.bool)
    total = max(0, (queries - m - k) // (m + r))
    step = 0
    while bool(live.any()):
        stat = robust_statistic(hist, statistic, quantile)
        found = live & (stat <= 0)
        if k == 0:
            broken |= found & (stat < 0)
            live &= ~found
        else:
            live &= ~(found & (queries - used < k))
            pending = (found & live).nonzero().flatten()
            for _ in range(k):  # sequential: a failed confirmation stops at its first correct reading
                if len(pending) == 0:
                    break
                (fresh,) = read([(x_best[pending], y[pending], 1)])
                used[pending] += 1
                push(pending, fresh)
                pending = pending[fresh[:, 0] < 0]
            broken[pending] = True
            live[pending] = False
        search = live & ~found & (queries - used >= m + r + k)
        live &= found | search
        active = search.nonzero().flatten()
        if len(active) == 0:
            continue
        candidate = windows.candidates(active, x_best[active], windows.side(step, total))
        if r:
            again, cand = read([(x_best[active], y[active], 1), (candidate, y[active], m)])
            push(active, again)
        else:
            (cand,) = read([(candidate, y[active], m)])
        used[active] += r + m
        better = robust_statistic(cand, statistic, quantile) < robust_statistic(hist[active], statistic, quantile)
        x_best[active[better]] = candidate[better]
        hist[active[better]] = cand[better]
        step += 1
    return SquareResult(x_best, used, broken)


def _square_fraction(p_init: float, step: int, total: int) -> float:
    """The reference's piecewise-constant schedule of the square's area, over ``total`` iterations."""
    progress = int(step * 10000 / max(total, 1))
    for bound, factor in (
        (10, 1),
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
    ):
        if progress <= bound:
            return p_init / factor
    return p_init / 512
