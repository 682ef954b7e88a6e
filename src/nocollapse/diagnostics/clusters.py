"""Cluster-level collapse measures of hard assignments (each sample's arg-max prototype or code)
and of the embeddings they partition.

* :func:`cluster_size_stats` -- cluster collapse: how many of the K clusters are used and how
  unevenly the samples spread over them.
* :func:`intracluster_variance_ratio` -- intracluster collapse: the share of the embeddings'
  variance left inside the clusters.
* :func:`minmax_moment_spectrum` -- dimensional collapse as the CPLearn paper plots it: the
  eigenvalues of the uncentred second moment of min-max scaled embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cluster_size_stats", "intracluster_variance_ratio", "minmax_moment_spectrum"]


def _labels(assigned: Tensor, n: int | None = None) -> Tensor:
    if not isinstance(assigned, Tensor) or assigned.ndim != 1 or assigned.is_floating_point():
        raise ValueError("assigned must be a 1-D integer tensor of cluster ids")
    if assigned.numel() == 0:
        raise ValueError("assigned is empty")
    if n is not None and assigned.numel() != n:
        raise ValueError(f"assigned has {assigned.numel()} entries, the embeddings {n} rows")
    if int(assigned.min()) < 0:
        raise ValueError("cluster ids must be >= 0")
    return assigned.detach().cpu().long()


def cluster_size_stats(assigned: Tensor, num_clusters: int) -> dict[str, float | int]:
    """Sizes of the clusters of ``assigned`` (``[N]`` ids in ``[0, K)``).

    * ``used``: clusters with at least one sample, ``used_fraction = used / K`` and
      ``used_fraction_capped = used / min(K, N)`` (N samples fill at most N clusters);
    * ``largest_fraction``: the share of the samples in the largest cluster (1 when all share one);
    * ``median_size``: the median size of the used clusters; ``singletons``: used clusters of one;
    * ``size_perplexity = exp(H(n_k / N))``: the number of equally filled clusters with the same
      entropy (``used`` when the used clusters are equal, 1 when one cluster holds everything).
    """
    ids = _labels(assigned)
    if int(ids.max()) >= num_clusters:
        raise ValueError(f"cluster ids must lie in [0, {num_clusters})")
    sizes = torch.bincount(ids, minlength=num_clusters)
    used_sizes = sizes[sizes > 0].double()
    n = int(ids.numel())
    share = used_sizes / n
    return {
        "num_clusters": int(num_clusters),
        "used": int(used_sizes.numel()),
        "used_fraction": used_sizes.numel() / num_clusters,
        "used_fraction_capped": used_sizes.numel() / min(num_clusters, n),
        "largest_fraction": float(share.max()),
        "median_size": float(used_sizes.median()),
        "singletons": int((used_sizes == 1).sum()),
        "size_perplexity": math.exp(float(-(share * share.log()).sum())),
    }


def intracluster_variance_ratio(embeddings: Tensor, assigned: Tensor) -> float:
    """``sum_k sum_{i in k} ||h_i - mean_k||^2 / sum_i ||h_i - mean||^2``: the fraction of the
    embeddings' total variance that lies inside the clusters (1 minus the variance the clusters
    explain).

    0 means intracluster collapse (every cluster is a single point); it does not depend on the
    embedding dimension, so methods with different widths compare without padding. Singleton
    clusters contribute no within-cluster variance, so many tiny clusters drive it down: read it
    next to :func:`cluster_size_stats`.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError("embeddings must be a 2-D tensor [N, D]")
    h = embeddings.detach().cpu().double()
    ids = _labels(assigned, h.shape[0])
    total = float(((h - h.mean(0)) ** 2).sum())
    if total <= 0:
        return 0.0
    k = int(ids.max()) + 1
    counts = torch.bincount(ids, minlength=k).double()
    sums = torch.zeros(k, h.shape[1], dtype=torch.float64).index_add_(0, ids, h)
    # within = sum ||h||^2 - sum_k ||S_k||^2 / n_k
    used = counts > 0
    within = float((h ** 2).sum()) - float(((sums[used] ** 2).sum(1) / counts[used]).sum())
    return max(0.0, within) / total


def minmax_moment_spectrum(embeddings: Tensor) -> list[float]:
    """Eigenvalues (descending) of ``E^T E / N`` for the embeddings scaled globally to [0, 1],
    ``E = (H - min H) / (max H - min H)`` (one min and max over the whole matrix, not per
    dimension; no padding to a common width): the dimensional-collapse plot of the CPLearn
    paper, whose log decays fast when few directions carry the embeddings."""
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError("embeddings must be a non-empty 2-D tensor [N, D]")
    h = embeddings.detach().cpu().double()
    lo, hi = h.min(), h.max()
    e = (h - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(h)
    moment = e.t() @ e / e.shape[0]
    values = torch.linalg.eigvalsh(moment).flip(0).clamp_min(0.0)
    return [float(v) for v in values]
