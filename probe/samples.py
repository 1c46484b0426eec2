"""Which test images are attacked: class-stratified random samples of the test split, drawn with a fixed seed.

A test split may be stored by class (the embedded MNIST split is), so "the first n test images"
can be a single class. Instead every attacked set is a prefix of one *balanced order*: each
class's test indices in a seeded random order, interleaved class by class (one image of every
class, then a second of every class, ...). A prefix of ``per_class × classes`` images holds
exactly ``per_class`` images of each class, and a smaller sample is a prefix of a larger one, so
an image keeps its position in every set it belongs to and results on nested sets line up.
"""

from __future__ import annotations

from collections import Counter

import torch

SAMPLE_SEED = 0


def balanced_order(labels: torch.Tensor, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """Indices of every test item, in an order whose every prefix of k·C items has k of each of the C classes.

    Items of a class beyond the smallest class's count come last (a split with unequal classes
    is balanced only up to its smallest class).
    """
    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(seed)
    per_class = []
    for c in sorted(set(labels.tolist())):
        idx = (labels == c).nonzero().flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=gen)])
    depth = min(len(p) for p in per_class)
    balanced = torch.stack(
        [p[:depth] for p in per_class], 1
    ).flatten()  # rank 0 of every class, rank 1 of every class, ...
    rest = [p[depth:] for p in per_class]
    return torch.cat([balanced, *rest])


def balanced_sample(labels: torch.Tensor, per_class: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """``per_class`` random test items of every class (a prefix of :func:`balanced_order`)."""
    labels = torch.as_tensor(labels).long()
    classes = len(set(labels.tolist()))
    smallest = min(Counter(labels.tolist()).values())
    if not 1 <= per_class <= smallest:
        raise ValueError(
            f"per_class must be in [1, {smallest}] (the smallest class of the test split), got {per_class}"
        )
    return balanced_order(labels, seed)[: per_class * classes]


def class_counts(labels: torch.Tensor, indices) -> dict[int, int]:
    """{class: items of that class among ``indices``} over every class of ``labels`` (0 for absent ones)."""
    labels = torch.as_tensor(labels).long()
    counts = Counter(labels[torch.as_tensor(indices, dtype=torch.long)].tolist())
    return {c: counts.get(c, 0) for c in sorted(set(labels.tolist()))}


def describe(counts: dict[int, int], class_names: list[str] | None = None) -> str:
    """``"50 of each of the 10 classes"``, or the per-class counts when they differ."""
    values = set(counts.values())
    if len(values) == 1:
        return f"{values.pop()} of each of the {len(counts)} classes"
    names = class_names or [str(c) for c in counts]
    return ", ".join(f"{n} × {names[c]}" for c, n in counts.items())
