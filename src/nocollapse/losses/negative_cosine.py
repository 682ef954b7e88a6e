"""Losses that regress a prediction onto a target by their cosine: BYOL (Grill et al. 2020) and
SimSiam (Chen & He 2021), as pure functions.

Both compare the predictor output ``p`` of one view with the projection ``z`` of the other view
(``[n, d]`` each, not normalised; the functions L2-normalise them), in both directions. With
``cos(a, b) = <a, b> / (||a|| ||b||)`` per sample and ``mean`` over the batch:

BYOL, the normalised mean squared error of the DeepMind code, both directions summed::

    ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)
    L = mean_i [ (2 - 2 cos(p1_i, sg(z2_i))) + (2 - 2 cos(p2_i, sg(z1_i))) ]      in [0, 8]

SimSiam, the negative cosine ``D`` with a stop-gradient ``sg`` on ``z``, symmetrised::

    D(p, z) = -mean_i cos(p_i, z_i)
    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2                                      in [-1, 1]

``sg`` is ``detach``: the target receives no gradient. For BYOL the targets come from the EMA
network, which takes no gradient anyway; the detach makes the function safe on any input. For
SimSiam the stop-gradient is what keeps the model from collapsing, and ``stop_gradient=False``
removes it (the paper's failure experiment). In both forms the minimum (0, resp. -1) is reached by
a collapsed model as well as by a perfectly invariant one.

Written against lightly's ``NegativeCosineSimilarity`` (``NC``, which does not detach):
``L_BYOL = 4 + 2 NC(p1, z2) + 2 NC(p2, z1)`` and ``L_SimSiam = NC(p1, z2) / 2 + NC(p2, z1) / 2``.

Nothing here crosses processes: the mean is over this process's share of the batch, and the
mean over processes (as DDP averages gradients) is the loss of the global batch. The original
implementations communicate only through synchronised BatchNorm in the heads
(``model.sync_batchnorm``), not in the loss. The cosines are computed in fp32 with autocast off.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
    """Per-sample ``cos(p_i, z_i)`` in fp32, ``[n]``; ``z`` detached when ``stop_gradient``."""
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"prediction and target must both be [n, d], got {tuple(p.shape)} and {tuple(z.shape)}")
    if stop_gradient:
        z = z.detach()
    with torch.autocast(p.device.type, enabled=False):
        return (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)


def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -mean_i cos(p_i, z_i)``, with ``z`` detached when ``stop_gradient``."""
    return -_cosine(p, z, stop_gradient).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 stop_gradient: bool = True) -> torch.Tensor:
    """``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` (see the module doc); ``stop_gradient=False``
    lets the gradient flow into ``z`` too (the collapse experiment of the paper's Fig. 2)."""
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(p2, z1, stop_gradient)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised normalised MSE, ``mean_i [(2 - 2 cos(p1_i, z2_i)) + (2 - 2 cos(p2_i,
    z1_i))]`` with the targets ``z`` detached (see the module doc); ``p1`` is the online
    prediction of view 1, ``z2`` the target projection of view 2."""
    return (4.0 - 2.0 * _cosine(p1, z2, True) - 2.0 * _cosine(p2, z1, True)).mean()
