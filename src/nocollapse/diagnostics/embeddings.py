"""Embedding-level collapse metrics: effective rank, spectrum, spread and mean direction.

All functions take an embedding matrix ``Z`` of shape ``[N, D]`` (N samples, D
dimensions), detach it, compute in float64 on the CPU and return Python numbers
(or a float64 tensor for the spectrum).

* Representation collapse: all embeddings point the same way. ``embedding_std -> 0``,
  ``mean_direction_norm -> 1`` and ``mean_pairwise_cosine -> 1``.
* Dimensional collapse: embeddings span only a few directions. ``effective_rank`` is
  far below ``min(N, D)``; ``alpha_req`` (the power-law decay of the spectrum) is large;
  ``direction_rank`` (the directions' rank, centred) falls while the per-dimension spread can
  stay healthy.
* ``lidar`` needs several views per sample: the effective rank of the directions that separate
  samples more than their augmentations move them.

``effective_rank`` follows RankMe's paper (Garrido et al. 2023): the entropy of the normalised
*singular values* of the uncentred ``Z``. Some implementations (the ``reptrix`` package among
them) use the eigenvalues of the centred covariance instead, i.e. squared singular values of the
centred matrix, which gives a smaller number for the same embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "alpha_req",
    "lidar",
    "singular_values",
    "effective_rank",
    "effective_rank_from_singular_values",
    "embedding_std",
    "mean_direction_norm",
    "mean_pairwise_cosine",
    "direction_rank",
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

    What it can and cannot see: it shows *dimensional* collapse (few directions carry the
    embeddings). Uncentred, a shared mean direction counts as one direction, so embeddings in a
    narrow cone around it (a head without batch norm) read as low-rank although they may vary in
    many directions: pass ``center=True`` to measure the spread around the mean. It cannot see
    *cluster* collapse (a handful of tight, well-separated clumps still span many directions) or
    whether the directions it counts carry information about the images rather than noise.
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


def mean_pairwise_cosine(embeddings: Tensor) -> float:
    r"""Mean cosine similarity over the ``N (N - 1)`` ordered pairs of distinct rows.

    .. math:: \bar c = \frac{\lVert\sum_i u_i\rVert^2 - N}{N (N - 1)}, \quad u_i = z_i / \lVert z_i\rVert

    (one pass, no ``N x N`` matrix; needs ``N >= 2``). 1 when every embedding points the same
    way, about 0 for embeddings spread over the sphere, and as low as ``-1 / (N - 1)``. It sees
    representation collapse (one shared direction), not a narrow cone that still spreads; read
    it with :func:`embedding_std`, which measures the spread around the shared direction.
    """
    z = _as_matrix(embeddings)
    n = z.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 samples")
    total = _unit_rows(z).sum(dim=0)
    return float((total @ total - n) / (n * (n - 1)))


def direction_rank(embeddings: Tensor) -> float:
    r"""RankMe effective rank of the L2-normalised rows with their mean removed.

    .. math:: \operatorname{RankMe}\big(U - \mathbf 1 \bar u^\top\big), \quad u_i = z_i / \lVert z_i\rVert

    The number of directions in which the samples' directions differ, whatever their scale and
    whatever direction they share: it falls when the embeddings span only a few dimensions
    (dimensional collapse, which leaves :func:`embedding_std` and :func:`mean_direction_norm`
    looking healthy), and it does not count a shared mean direction as a dimension of the data,
    as the uncentred :func:`effective_rank` does. At most ``min(N - 1, D)``. Computed from the
    smaller Gram matrix (``N x N`` or ``D x D``) in float64.
    """
    z = _as_matrix(embeddings)
    if z.shape[0] < 2:
        raise ValueError("direction_rank needs at least 2 samples")
    u = _unit_rows(z)
    u = u - u.mean(dim=0, keepdim=True)
    gram = u @ u.T if u.shape[0] <= u.shape[1] else u.T @ u
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return effective_rank_from_singular_values(eigenvalues.sqrt().flip(0))


def alpha_req(embeddings: Tensor, fit_range: tuple[int, int] = (10, 100)) -> dict[str, float]:
    """alpha-ReQ (Agrawal et al., NeurIPS 2022): the power-law decay of the eigenspectrum.

    With ``lambda_1 >= lambda_2 >= ...`` the eigenvalues of the centred covariance of ``Z``
    (normalised to sum to 1; the decay does not depend on the scale), fit

        ln lambda_i = -alpha ln i + b       for ranks i in [lo, hi)

    by least squares. ``alpha`` near 1 is the range the paper finds best; a large ``alpha`` means
    a few directions carry the embeddings (dimensional collapse), a small one a flat, noise-like
    spectrum. Returns ``{"alpha", "r2", "fit_lo", "fit_hi"}`` (``r2`` of the fit in log-log).

    Failure modes: the centred covariance has rank at most ``min(N - 1, D)``, so ranks beyond it
    are zeros; the fit range is clipped to the non-zero eigenvalues and needs at least 3 of them
    (use ``N`` well above ``D``, and skip the first few eigenvalues, which rarely follow the law).

    What it can and cannot see: only the *shape* of the spectrum inside the fit range. Complete
    representation collapse (every embedding the same point) leaves a spectrum of rounding noise
    whose decay can look healthy, dimensional collapse into fewer directions than ``fit_lo``
    falls outside the range, and cluster collapse changes the spectrum little. Read it together
    with :func:`embedding_std` and :func:`effective_rank`.
    """
    z = _as_matrix(embeddings)
    z = z - z.mean(dim=0, keepdim=True)
    eig = torch.linalg.eigvalsh(z.t() @ z / max(1, z.shape[0] - 1)).flip(0)
    eig = eig / eig.sum() if float(eig.sum()) > 0 else eig
    positive = int((eig > 1e-12 * float(eig[0])).sum()) if float(eig[0]) > 0 else 0
    lo, hi = int(fit_range[0]), min(int(fit_range[1]), positive)
    if lo < 0 or hi - lo < 3:
        raise ValueError(f"alpha-ReQ needs at least 3 non-zero eigenvalues in ranks [{fit_range[0]}, "
                         f"{fit_range[1]}); this matrix has {positive} (N = {z.shape[0]}, D = {z.shape[1]})")
    ranks = torch.arange(lo + 1, hi + 1, dtype=torch.float64)   # rank i of eigenvalue index i - 1
    x, y = torch.log(ranks), torch.log(eig[lo:hi])
    design = torch.stack([-x, torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
    residual = y - design @ solution
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual ** 2).sum() / total) if float(total) > 0 else 1.0
    return {"alpha": float(solution[0]), "r2": r2, "fit_lo": lo, "fit_hi": hi}


def lidar(views: Tensor, delta: float = 1e-6, eps: float = 1e-7) -> float:
    """LiDAR (Thilak et al., ICLR 2024): the effective rank of the linear discriminant of samples
    against their augmentations.

    ``views`` is ``[N, q, D]``: q augmented views of each of N samples (q >= 2), each sample its own
    class. With ``mu_i`` the mean of sample i's views and ``mu`` the mean of those,

        S_b = (1/N) sum_i (mu_i - mu)(mu_i - mu)^T
        S_w = (1/(N q)) sum_i sum_j (z_ij - mu_i)(z_ij - mu_i)^T + delta I
        S   = S_w^(-1/2) S_b S_w^(-1/2)

    and LiDAR ``= exp(-sum_k p_k ln p_k)``, ``p_k = lambda_k / sum lambda + eps``, over the
    eigenvalues of ``S``: how many directions separate samples more than augmentations move them.
    It lies between 1 and ``min(N - 1, D)``.

    Failure modes: with ``N - 1 < D`` the between-sample scatter has rank at most ``N - 1``, which
    caps LiDAR; with ``N q`` small against D the within scatter is singular and ``delta`` sets the
    result in the directions the views never vary in (raise N or q rather than delta).

    What it can and cannot see: the ratio is invariant to the scale of each direction, so LiDAR
    counts the directions in which samples differ more than their views, *however small* those
    differences are. It is blind to representation collapse: when every sample is mapped to
    nearly one point and the views only add isotropic noise, the remaining tiny between-sample
    differences still exceed the view noise in most directions and LiDAR stays near a healthy
    embedding's (``tests/test_representation_measures.py`` builds such a case). Check the scale separately
    (:func:`embedding_std`, :func:`mean_direction_norm`).
    """
    if not isinstance(views, Tensor) or views.ndim != 3 or views.shape[1] < 2:
        raise ValueError("views must be [N, q, D] with q >= 2 views per sample")
    z = views.detach().to(device="cpu", dtype=torch.float64)
    n, q, d = z.shape
    if n < 2:
        raise ValueError("LiDAR needs at least 2 samples")
    mu_i = z.mean(dim=1)
    centred_means = mu_i - mu_i.mean(dim=0, keepdim=True)
    between = centred_means.t() @ centred_means / n
    spread = (z - mu_i[:, None, :]).reshape(n * q, d)
    within = spread.t() @ spread / (n * q) + delta * torch.eye(d, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(within)
    inv_sqrt = vectors @ torch.diag(values.clamp_min(1e-300).rsqrt()) @ vectors.t()
    lam = torch.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt).clamp_min(0.0)
    p = lam / lam.sum() + eps
    return math.exp(float(-(p * p.log()).sum()))
