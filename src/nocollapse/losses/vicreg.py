"""VICReg (Bardes, Ponce & LeCun 2022): variance, invariance and covariance terms on two views'
projections, with the reductions of the official code.

For the projections ``z_a``, ``z_b`` (``[n, d]``, not normalised) of two views of the same images:

    s(Z_a, Z_b) = mean over the n x d entries of (z_a - z_b)^2          (F.mse_loss)
    v(Z)        = (1/d) sum_j max(0, gamma - sqrt(Var_i(z_ij) + eps))   (unbiased variance)
    c(Z)        = (1/d) sum_{j != k} Cov(Z)_jk^2,   Cov(Z) = (Z - mean Z)^T (Z - mean Z) / (N - 1)

    L = lambda * s  +  mu * (v(Z_a) + v(Z_b)) / 2  +  nu * (c(Z_a) + c(Z_b))

with lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4 by default. As in the official code (and
lightly's ``VICRegLoss``), ``s`` is the mean over dimensions rather than the paper's sum, the
variance term is halved per branch and the covariance term is not. A constant output (both views
the same vector) has ``s = c = 0`` and ``v = gamma - sqrt(eps)`` per branch, so
``L = mu * (gamma - sqrt(eps))`` (24.75 with the defaults).

Across processes, as in the official code: ``s`` is computed on this process's rows (with equal
shares, the mean of the per-process values, which DDP's gradient averaging takes, is the joined
batch's); ``v`` and ``c`` are computed on both branches gathered from all processes with their
gradient (``all_gather_cat``), so ``N`` is the global batch and every process holds the global
value. The mean of the per-process losses, and the DDP-averaged gradients, are then those of one
process holding the joined batch.

Everything is computed in fp32 with autocast off.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..utils import distributed as dist_utils
from .matrices import off_diagonal_sum_of_squares

EPS = 1e-4


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """``v(Z) = mean_j relu(gamma - sqrt(Var_i z_ij + eps))`` (unbiased variance over the rows)."""
    std = torch.sqrt(z.var(dim=0, correction=1) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``c(Z) = sum_{j != k} Cov(Z)_jk^2 / d`` with ``Cov`` normalised by ``N - 1``."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = (centred / (n - 1)).t() @ centred      # the 1 / (n - 1) on the [n, d] factor, not on d x d
    return off_diagonal_sum_of_squares(cov) / d


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, gamma: float = 1.0,
                 eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unweighted terms ``s``, ``(v(Z_a) + v(Z_b)) / 2`` and ``c(Z_a) + c(Z_b)`` (module doc);
    ``s`` on this process's rows, the other two on the global batch."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 1:
        raise ValueError(f"z_a and z_b must both be [n, d] with n >= 1, got {tuple(z_a.shape)} "
                         f"and {tuple(z_b.shape)}")
    with torch.autocast(z_a.device.type, enabled=False):
        a, b = z_a.float(), z_b.float()
        invariance = F.mse_loss(a, b)
        a, b = dist_utils.all_gather_cat(a), dist_utils.all_gather_cat(b)
        if a.shape[0] < 2:
            raise ValueError(f"VICReg's variance and covariance need a (global) batch of at least 2 "
                             f"samples, got {a.shape[0]}")
        variance = 0.5 * (variance_term(a, gamma, eps) + variance_term(b, gamma, eps))
        covariance = covariance_term(a) + covariance_term(b)
    return invariance, variance, covariance


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, invariance_weight: float = 25.0,
                variance_weight: float = 25.0, covariance_weight: float = 1.0, gamma: float = 1.0,
                eps: float = EPS) -> torch.Tensor:
    """``lambda * s + mu * (v_a + v_b) / 2 + nu * (c_a + c_b)`` (see the module doc)."""
    for name, value in (("invariance_weight", invariance_weight), ("variance_weight", variance_weight),
                        ("covariance_weight", covariance_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    invariance, variance, covariance = vicreg_terms(z_a, z_b, gamma, eps)
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


def collapsed_vicreg_loss(variance_weight: float = 25.0, gamma: float = 1.0, eps: float = EPS) -> float:
    """The loss of a constant output (both views the same vector): ``mu * max(0, gamma - sqrt(eps))``."""
    return variance_weight * max(0.0, gamma - eps ** 0.5)
