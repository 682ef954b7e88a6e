"""CLOP's prototype term (Li, Nguyen & Pimentel-Alarcon, arXiv 2403.18699): fixed orthonormal
class prototypes that pull the embeddings of labelled samples.

The prototypes (``prototypes.fixed.orthonormal_prototypes``) are ``C`` orthonormal rows. For the two views' projections
``z1``, ``z2`` and a sample with label ``y >= 0`` (unit vectors ``u = z / ||z||``):

* ``distance="cosine"``: ``l = 1 - (cos(z1, c_y) + cos(z2, c_y)) / 2``, 0 at ``u = c_y`` and 1
  when orthogonal (equal to ``||u - c_y||^2 / 4`` summed over the two views);
* ``distance="euclidean"``: ``l = (||u1 - c_y|| + ||u2 - c_y||) / 2`` (unsquared, as the
  authors' code).

``L_CLOP = mean over the labelled samples of the global batch of l``; samples labelled -1 are
ignored and a batch without labelled samples gives 0. The mean runs over all processes (the sum
is all-reduced with gradients), so every process returns the global value and, with DDP's
gradient averaging, the gradient is that of one process holding the global batch: the weight of
the term is not divided by the number of processes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..utils import distributed as dist_utils

DISTANCES = ("cosine", "euclidean")


def clop_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None, prototypes: torch.Tensor,
              distance: str = "cosine") -> torch.Tensor:
    """The prototype term over the labelled samples of the global batch (see the module doc)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[1] != prototypes.shape[1]:
        raise ValueError(f"z1 and z2 must both be [n, {prototypes.shape[1]}], got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        if labels is None:
            labels = torch.full((z1.shape[0],), -1, dtype=torch.long, device=z1.device)
        labelled = labels >= 0
        if labels.numel() and int(labels.max()) >= prototypes.shape[0]:
            raise ValueError(f"labels must be below the number of prototypes ({prototypes.shape[0]})")
        u1, u2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
        target = prototypes.float()[labels.clamp_min(0)]
        if distance == "cosine":
            per_sample = 1.0 - 0.5 * ((u1 * target).sum(1) + (u2 * target).sum(1))
        else:
            per_sample = 0.5 * ((u1 - target).norm(dim=1) + (u2 - target).norm(dim=1))
        local_sum = (per_sample * labelled.float()).sum()
        count = dist_utils.all_reduce_sum(labelled.float().sum())
        total = dist_utils.all_reduce_sum_with_grad(local_sum)
        return total / count.clamp_min(1.0)
