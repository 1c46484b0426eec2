"""Checks of the evaluation itself, shared by ``codedsmooth attack`` and ``codedsmooth report``: Carlini et
al. (2019)-style sanity checks with one set of thresholds, each stating what it checks, its numbers
and whether it passed; the report's own checks are in :mod:`.report.checks`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from codedsmooth.core import CodingSpec

from .targets import RCIModel

LARGE_EPS = 0.5


def _reference(r: float | None) -> float:
    """The reference a comparing check needs (a check called without one is a bug in the caller)."""
    if r is None:
        raise ValueError("this check compares the measured value with a reference; none was given")
    return r


# name: (what it checks, tolerance, passes(measured, reference, tolerance)). Accuracies are shares in [0, 1].
CHECKS: dict[str, tuple[str, float, Callable[[float, float | None, float], bool]]] = {
    "identity permutation": (
        "attacking RCI with every draw fixed (identity permutation, fixed companions) reaches the no-RCI accuracy: the attack can break the coded model when nothing is random",
        0.05,
        lambda m, r, t: m <= _reference(r) + t,
    ),
    "iterative ≤ one step": (
        "the iterative attack is at least as strong as one FGSM step",
        0.03,
        lambda m, r, t: m <= _reference(r) + t,
    ),
    "large eps": (
        f"at ε = {LARGE_EPS} (where a human no longer sees the digit) the attack drives accuracy to about 0",
        0.10,
        lambda m, r, t: m <= t,
    ),
    "black-box ≤ white-box": (
        "a query or transfer attack does not find more than the white-box worst case on the same images",
        0.0,
        lambda m, r, t: m >= _reference(r) - t,
    ),
    "transfer ≤ white-box": (
        "adversarials of another seed's model do less harm than the model's own white-box ones",
        0.0,
        lambda m, r, t: m >= _reference(r) - t,
    ),
    "more steps and restarts no longer help": (
        "doubling every attack's steps and restarts lowers the worst case by at most the tolerance (the suite has converged)",
        0.01,
        lambda m, r, t: _reference(r) - m <= t,
    ),
    "ε-curve reaches ~0": ("the ε-curve reaches about 0 at its largest ε", 0.02, lambda m, r, t: m <= t),
}


def check(name: str, measured: float, reference: float | None = None, *, numbers: str, **context) -> dict:
    """One check's record: what it checks, its numbers, the tolerance and whether it passed."""
    what, tolerance, passes = CHECKS[name]
    return {
        "name": name,
        "what": what,
        **context,
        "value": numbers,
        "measured": measured,
        "reference": reference,
        "tolerance": tolerance,
        "passed": bool(passes(measured, reference, tolerance)),
    }


def failure_lines(checks: list[dict]) -> list[str]:
    """A failed check, printed with what it checks and its numbers."""
    return [
        f"sanity check failed: {c['name']} ({c['what']}): {c['value']} (tolerance {100 * c['tolerance']:g} points)"
        for c in checks
        if not c["passed"]
    ]


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def identity_permutation(ck, spec: CodingSpec, pool, x, y, eps: float, craft: Callable, seed: int, **context) -> dict:
    """``craft(model_fn, x, y, eps)`` against RCI with every draw fixed, and against the plain model."""
    fixed = RCIModel(ck, spec, pool, seed=seed, deterministic=True)
    plain = RCIModel(ck, CodingSpec.plain())
    acc_fixed = _accuracy(fixed, craft(fixed, x, y, eps), y)
    acc_plain = _accuracy(plain, craft(plain, x, y, eps), y)
    return check(
        "identity permutation",
        acc_fixed,
        acc_plain,
        eps=eps,
        numbers=f"{100 * acc_fixed:.1f} % with RCI fixed vs {100 * acc_plain:.1f} % without RCI (n = {len(y)})",
        **context,
    )
