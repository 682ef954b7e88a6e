"""Long-tailed subsampling with an exponential per-class profile (the CIFAR-LT convention).

With C classes, imbalance ratio r = n_max / n_min and n_max the size of the largest class, class
c (in index order) keeps

    n_c = floor(n_max * r^(-c / (C - 1))),

so class 0 keeps n_max images and class C-1 keeps n_max / r (Cui et al. 2019; Cao et al. 2019).
Which images a class keeps is a seeded random choice.
"""

from __future__ import annotations

import math

import torch


def long_tail_counts(class_sizes: list[int], imbalance_ratio: float) -> list[int]:
    """Per-class counts of the exponential profile, capped by what each class has."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    num_classes = len(class_sizes)
    if num_classes == 0:
        raise ValueError("no classes")
    n_max = max(class_sizes)
    counts = []
    for c, available in enumerate(class_sizes):
        exponent = c / (num_classes - 1) if num_classes > 1 else 0.0
        target = max(1, math.floor(n_max * imbalance_ratio ** (-exponent) + 1e-9))
        counts.append(min(available, target))
    return counts


def long_tail_indices(labels: torch.Tensor, num_classes: int, imbalance_ratio: float,
                      seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of a seeded long-tailed subset of ``labels``."""
    sizes = torch.bincount(labels, minlength=num_classes).tolist()
    return sample_per_class(labels, dict(enumerate(long_tail_counts(sizes, imbalance_ratio))), seed)


def sample_per_class(labels: torch.Tensor, counts: dict[int, int], seed: int) -> torch.Tensor:
    """Sorted indices of ``counts[c]`` samples of each class ``c`` (in ascending class order), chosen
    by one generator seeded by ``seed`` that draws a permutation of every listed class."""
    gen = torch.Generator().manual_seed(int(seed))
    keep = []
    for c in sorted(counts):
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        keep.append(members[torch.randperm(len(members), generator=gen)[:counts[c]]])
    if not keep:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(keep).sort().values
