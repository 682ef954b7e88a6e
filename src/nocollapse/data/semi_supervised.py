"""The labelled subset of a semi-supervised run: which training images keep their label.

A fixed subset, stratified by class and drawn from a generator seeded by ``data.label_seed``
alone, so that changing ``train.seed`` (or the number of processes) does not change it: each
class keeps ``round(fraction * n_c)`` of its ``n_c`` images (at least one when the fraction is
positive), or ``min(per_class, n_c)``. It is drawn from the training split the method trains on,
that is after any long-tail subsampling. Samples outside the subset are labelled -1.
"""

from __future__ import annotations

import torch

from .long_tail import sample_per_class


def labelled_subset(labels: torch.Tensor, fraction: float = 1.0, per_class: int | None = None,
                    seed: int = 0) -> torch.Tensor:
    """Sorted indices of the samples that keep their label (``labels`` of -1 are never chosen)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    counts = {}
    for c, size in zip(*(t.tolist() for t in torch.unique(labels[labels >= 0], return_counts=True))):
        if per_class is not None:
            counts[c] = min(per_class, size)
        else:
            counts[c] = max(int(round(fraction * size)), 1) if fraction > 0 else 0
    return sample_per_class(labels, counts, seed)


def masked_labels(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``labels`` with every sample outside ``keep`` set to -1."""
    out = torch.full_like(labels, -1)
    out[keep] = labels[keep]
    return out
