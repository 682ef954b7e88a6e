"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections, pushed to
the identity.

For the projections ``z_a``, ``z_b`` (``[N, d]``) of two views of the same ``N`` images, each is
standardised along the batch, per dimension,

    zhat_k = (z_k - mean_n z_k) / sqrt(var_n z_k + eps)      (biased variance, eps = 1e-5)

(the affine-free, train-mode BatchNorm of the official code, not the unbiased, eps-free std of
the paper's pseudocode), and

    C = zhat_a^T zhat_b / N                                   ([d, d], C_ij in [-1, 1])

    L = scale * ( sum_i (1 - C_ii)^2  +  lambda * sum_i sum_{j != i} C_ij^2 ).

The first sum is the invariance term, the second the redundancy-reduction term. Both are sums,
not means, so the loss grows with ``d``; ``scale`` is solo-learn's ``scale_loss`` (1 in the
current official code). A constant output has ``zhat = 0``, hence ``C = 0`` and ``L = scale * d``.

Across processes (each holding an equal share of the batch), ``N`` is the global batch and the
result is that of one process holding it, in value and in gradient (with DDP's averaging of
gradients): the mean and the variance are computed from sums all-reduced *with* their gradient,
and so is ``C`` (each process adds its rows' share ``zhat_a^T zhat_b / N``). The official code
standardises with SyncBatchNorm and sums ``C`` with a plain ``all_reduce``, which does not carry
the gradient of the other processes' terms and so scales the gradient by ``1 / world_size``
(lightly issue #1977, fixed in its PR #1980); this module follows the corrected form. lightly
and solo-learn instead standardise each process's share with its own statistics and average the
per-process ``C``: a different estimator unless every share has the same statistics.

Everything is computed in fp32 with autocast off.
"""

from __future__ import annotations

import torch

from ..utils import distributed as dist_utils
from .matrices import off_diagonal_sum_of_squares

BN_EPS = 1e-5


def _check(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 1:
        raise ValueError(f"z_a and z_b must both be [n, d] with n >= 1, got {tuple(z_a.shape)} "
                         f"and {tuple(z_b.shape)}")


def _global_count(z: torch.Tensor) -> int:
    """The global batch: every process holds an equal share (the engine's sampler guarantees it,
    as ``all_gather_cat`` needs it)."""
    n = z.shape[0] * dist_utils.world_size()
    if n < 2:
        raise ValueError(f"batch standardisation needs a (global) batch of at least 2 samples, got {n}")
    return n


def batch_standardise(z: torch.Tensor, eps: float = BN_EPS, n: int | None = None) -> torch.Tensor:
    """``(z - mean) / sqrt(var + eps)`` per column, with the mean and the biased variance of the
    global batch of ``n`` rows (all processes), kept differentiable across processes."""
    n = _global_count(z) if n is None else n
    mean = dist_utils.all_reduce_sum_with_grad(z.sum(0)) / n
    centred = z - mean
    var = dist_utils.all_reduce_sum_with_grad(centred.pow(2).sum(0)) / n
    return centred / torch.sqrt(var + eps)


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """``C = zhat_a^T zhat_b / N`` ``[d, d]`` over the global batch (fp32, autocast off)."""
    _check(z_a, z_b)
    with torch.autocast(z_a.device.type, enabled=False):
        n = _global_count(z_a)
        a = batch_standardise(z_a.float(), eps, n)
        b = batch_standardise(z_b.float(), eps, n)
        # 1 / n on the [rows, d] factor, not on the d x d product: one pass fewer over C
        return dist_utils.all_reduce_sum_with_grad((a / n).t() @ b)


def barlow_twins_terms(z_a: torch.Tensor, z_b: torch.Tensor,
                       eps: float = BN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The two unweighted terms: ``sum_i (1 - C_ii)^2`` and ``sum_{i != j} C_ij^2``."""
    c = cross_correlation(z_a, z_b, eps)
    with torch.autocast(c.device.type, enabled=False):
        invariance = (1.0 - torch.diagonal(c)).pow(2).sum()
        redundancy = off_diagonal_sum_of_squares(c)
    return invariance, redundancy


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_offdiag: float = 0.0051,
                      scale: float = 1.0, eps: float = BN_EPS) -> torch.Tensor:
    """``scale * (invariance + lambda_offdiag * redundancy)`` (see the module doc)."""
    if lambda_offdiag < 0:
        raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    invariance, redundancy = barlow_twins_terms(z_a, z_b, eps)
    return scale * (invariance + lambda_offdiag * redundancy)
