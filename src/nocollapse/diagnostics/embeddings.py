"""Embedding-level collapse metrics: effective rank, spectrum, spread and mean direction.

All functions take an embedding matrix ``Z`` of shape ``[N, D]`` (N samples, D
dimensions), detach it, compute in float64 on the CPU and return Python numbers
(or a float64 tensor for the spectrum).

* Representation collapse: all embeddings point the same way. ``embedding_std -> 0``
  and ``mean_direction_norm -> 1``.
* Dimensional collapse: embeddings span only a few directions. ``effective_rank`` is
  far below ``min(N, D)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "singular_values",
    "effective_rank",
    "effective_rank_from_singular_values",
    "embedding_std",
    "mean_direction_norm",
]


def _as_matrix(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(embeddings.shape)}")
    z = embeddings.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return z


def _unit_rows(z: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / torch.where(norms > 0, norms, torch.ones_like(norms))


def singular_values(embeddings: Tensor, center: bool = False) -> Tensor:
    """Singular values ``sigma_1 >= ... >= sigma_min(N,D) >= 0`` of ``Z`` (float64).

    With ``center=True`` the column means are subtracted first (``Z - 1 z_bar^T``); the
    centred matrix has rank at most ``N - 1``.
    """
    z = _as_matrix(embeddings)
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(z)


def effective_rank_from_singular_values(sigma: Tensor, eps: float = 1e-12) -> float:
    """RankMe effective rank of a spectrum: ``exp(-sum_i p_i ln p_i)``, ``p_i = sigma_i / sum_j sigma_j + eps``.

    Equal to ``r`` for ``r`` equal non-zero singular values; capped at ``len(sigma)`` (the
    ``eps`` can otherwise push it a hair above). Returns 0.0 for an all-zero spectrum.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).clamp_min(0)
    if s.numel() == 0:
        raise ValueError("empty spectrum")
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total + eps
    entropy = float(-torch.special.xlogy(p, p).sum())
    return min(math.exp(entropy), float(s.numel()))


def effective_rank(embeddings: Tensor, eps: float = 1e-12, center: bool = False) -> float:
    """RankMe (Garrido et al., 2023) effective rank of ``Z`` ``[N, D]``.

    .. math:: \\mathrm{erank}(Z) = \\exp\\Big(-\\sum_i p_i \\ln p_i\\Big),\\qquad
              p_i = \\frac{\\sigma_i(Z)}{\\sum_j \\sigma_j(Z)} + \\varepsilon

    computed on the **uncentred** matrix by default, as in RankMe. The result lies in
    ``[1, min(N, D)]`` for a non-zero matrix, equals ``r`` exactly for a rank-``r`` matrix
    with equal singular values, and is at most ``r`` for any rank-``r`` matrix. It is not
    divided by ``min(N, D)``: with centring, ``N`` samples span at most ``N - 1``
    directions, and normalising by ``min(N, D)`` would put a floor of ``1/N`` on a fully
    collapsed batch. Use ``N >> D`` samples (e.g. a queue) for a meaningful value.
    RankMe itself uses ``eps = 1e-7``, which adds up to ``(n - r) eps ln(1/eps)`` nats of
    entropy for a rank-``r`` matrix; the default here is much smaller.
    """
    return effective_rank_from_singular_values(singular_values(embeddings, center), eps)


def embedding_std(embeddings: Tensor) -> float:
    """Mean over dimensions of the per-dimension std over samples of L2-normalised rows.

    .. math:: \\frac{1}{D}\\sum_{d=1}^{D} \\mathrm{std}_i\\big(z_{id}/\\lVert z_i\\rVert\\big)

    (unbiased std, needs ``N >= 2``). About ``1/sqrt(D)`` for embeddings spread evenly over
    the sphere, and 0 when every embedding has the same direction.
    """
    z = _as_matrix(embeddings)
    if z.shape[0] < 2:
        raise ValueError("embedding_std needs at least 2 samples")
    return float(_unit_rows(z).std(dim=0, correction=1).mean())


def mean_direction_norm(embeddings: Tensor) -> float:
    """Norm of the mean of the L2-normalised rows: ``|| (1/N) sum_i z_i / ||z_i|| ||``.

    Near 0 for embeddings spread over the sphere (about ``1/sqrt(N)`` for random ones)
    and 1 when they all point the same way.
    """
    z = _as_matrix(embeddings)
    return float(torch.linalg.vector_norm(_unit_rows(z).mean(dim=0)))
