"""Statistics for robustness numbers: Wilson intervals and paired McNemar tests on per-image outcomes.

Every accuracy in a report is a count of images; the Wilson score interval says
how far that count can be trusted, and two methods (or RCI on and off) scored on
the same images are compared by their discordant pairs, not by their means (a sign
test when the per-image outcomes are expected accuracies over draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import binomtest, norm


@dataclass(frozen=True)
class Proportion:
    successes: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.value:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}] (n = {self.n})"


def wilson(successes: int, n: int, confidence: float = 0.95) -> Proportion:
    """Wilson score interval of a binomial proportion."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # the bounds at 0 and n are exactly 0 and 1
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Proportion(successes, n, low, high)


@dataclass(frozen=True)
class Paired:
    only_a: int  # images A gets right and B wrong
    only_b: int
    p_value: float  # exact two-sided McNemar test

    def supports_difference(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> Paired:
    """Exact McNemar test on the same images scored by two models (or settings)."""
    if correct_a.shape != correct_b.shape:
        raise ValueError(
            f"outcomes must cover the same images, got {tuple(correct_a.shape)} and {tuple(correct_b.shape)}"
        )
    a, b = correct_a.bool(), correct_b.bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return Paired(only_a, only_b, p)


def sign_test(score_a: torch.Tensor, score_b: torch.Tensor) -> Paired:
    """Exact two-sided sign test on per-image scores in [0, 1] of the same images (e.g. expected accuracy over
    draws): the images where A scores higher against those where B does. On 0/1 outcomes it is McNemar's test."""
    if score_a.shape != score_b.shape:
        raise ValueError(f"scores must cover the same images, got {tuple(score_a.shape)} and {tuple(score_b.shape)}")
    a, b = score_a.double(), score_b.double()
    only_a, only_b = int((a > b).sum()), int((a < b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return Paired(only_a, only_b, p)


@dataclass(frozen=True)
class Difference:
    """Accuracy of A minus accuracy of B on the same n items, with its confidence interval."""

    diff: float
    low: float
    high: float
    n: int


def paired_difference(only_a: int, only_b: int, n: int, confidence: float = 0.95) -> Difference:
    """Wald interval of the difference of two paired proportions from their discordant counts (the normal
    approximation McNemar's test rests on; sound at the thousands of images a clean comparison has)."""
    if n < 1 or min(only_a, only_b) < 0 or only_a + only_b > n:
        raise ValueError(f"need 0 <= only_a + only_b <= n and n >= 1, got {only_a} + {only_b} of {n}")
    z = norm.ppf(0.5 + confidence / 2)
    d = (only_a - only_b) / n
    half = z * math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    return Difference(d, d - half, d + half, n)
