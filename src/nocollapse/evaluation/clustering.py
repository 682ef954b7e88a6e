"""Clustering quality of frozen features and of prototype assignments.

Three scores compare a predicted partition (clusters) with the ground-truth
classes:

* ``acc``: Hungarian (best one-to-one matching) accuracy, see
  :func:`hungarian_accuracy`;
* ``nmi``: normalised mutual information with arithmetic-mean normalisation,
  ``NMI = I(Y; C) / ((H(Y) + H(C)) / 2)`` (scikit-learn's default);
* ``ami``: adjusted mutual information (Vinh et al., 2010), NMI corrected for chance,
  ``AMI = (I - E[I]) / (mean(H(Y), H(C)) - E[I])``: 0 for a random partition with any number of
  clusters, whereas NMI grows with the number of clusters even for random ones (10,000 samples
  spread at random over 16,384 clusters score NMI about 0.35), so AMI is the score to compare
  partitions with different numbers of clusters by;
* ``ari``: adjusted Rand index (Hubert & Arabie, 1985), the pair-counting
  agreement corrected for chance, ``ARI = (RI - E[RI]) / (max RI - E[RI])``.

Hungarian accuracy is reported only where the partition has as many possible clusters as there
are classes (k-means with k = classes); with more clusters it counts the samples of unmatched
clusters as wrong and says little.

Cluster ids and class ids may be any integers; only the partition matters.

SciPy and scikit-learn are imported inside the functions that use them, not with this module:
they are slow to import, and ``nocollapse.evaluation`` (which the training loop imports) loads
this module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "assignment_clustering",
    "cluster_metrics",
    "contingency_matrix",
    "hungarian_accuracy",
    "kmeans_clustering",
]


def _as_int_array(name: str, values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got {values.dtype}")
        array = values.detach().cpu().numpy()
    else:
        array = np.asarray(values)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer ids, got {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _check_pair(
    pred_clusters: Tensor | np.ndarray, labels: Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    clusters = _as_int_array("pred_clusters", pred_clusters)
    classes = _as_int_array("labels", labels)
    if clusters.shape[0] != classes.shape[0]:
        raise ValueError(
            f"pred_clusters has {clusters.shape[0]} entries but labels has {classes.shape[0]}"
        )
    if clusters.shape[0] == 0:
        raise ValueError("pred_clusters and labels are empty: clustering scores are undefined")
    return clusters, classes


def contingency_matrix(pred_clusters: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """Counts ``M[i, j]`` of samples in the i-th distinct cluster and j-th distinct class.

    Rows follow the sorted distinct cluster ids, columns the sorted distinct
    class ids.
    """
    clusters, classes = _check_pair(pred_clusters, labels)
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    _, class_idx = np.unique(classes, return_inverse=True)
    matrix = np.zeros((cluster_idx.max() + 1, class_idx.max() + 1), dtype=np.int64)
    np.add.at(matrix, (cluster_idx, class_idx), 1)
    return matrix


def hungarian_accuracy(pred_clusters: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Accuracy under the best one-to-one mapping of clusters to classes.

    ``acc = max_m (1/N) sum_i [m(c_i) == y_i]`` over injective maps ``m`` from
    clusters to classes, solved with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) on the contingency matrix.
    When there are more clusters than classes, the samples of unmatched
    clusters count as wrong; with fewer clusters, some classes stay unmatched.
    """
    from scipy.optimize import linear_sum_assignment

    matrix = contingency_matrix(pred_clusters, labels)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return float(matrix[rows, cols].sum() / matrix.sum())


def cluster_metrics(pred_clusters: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                    accuracy: bool = True) -> dict[str, float]:
    """NMI, AMI, ARI and (with ``accuracy``) the Hungarian accuracy of a partition against the labels.

    Returns ``{"nmi", "ami", "ari"[, "acc"]}`` as Python floats. ``nmi`` and ``ami`` use
    arithmetic-mean normalisation (scikit-learn's defaults); ``ari`` is scikit-learn's
    ``adjusted_rand_score``.
    """
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    clusters, classes = _check_pair(pred_clusters, labels)
    out = {
        "nmi": float(normalized_mutual_info_score(classes, clusters)),
        "ami": float(adjusted_mutual_info_score(classes, clusters)),
        "ari": float(adjusted_rand_score(classes, clusters)),
    }
    if accuracy:
        out["acc"] = hungarian_accuracy(clusters, classes)
    return out


def kmeans_clustering(
    features: Tensor,
    labels: Tensor,
    n_clusters: int | None = None,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
) -> dict[str, float | int]:
    """k-means on L2-normalised features, scored against the labels.

    Protocol: features are L2-normalised (so Euclidean k-means approximates
    clustering by cosine similarity), then scikit-learn's ``KMeans`` (k-means++
    initialisation, ``n_init`` restarts, ``random_state=seed``) is fit with
    ``n_clusters`` equal to the number of distinct labels unless given.

    Returns:
        ``{"acc", "nmi", "ami", "ari", "n_clusters"}`` (see :func:`cluster_metrics`).
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a float tensor of shape [N, D], got {shape}")
    classes = _as_int_array("labels", labels)
    num_samples = features.shape[0]
    if classes.shape[0] != num_samples:
        raise ValueError(f"features has {num_samples} rows but labels has {classes.shape[0]} entries")
    if num_samples == 0:
        raise ValueError("features is empty: k-means needs at least one sample")
    k = int(np.unique(classes).size) if n_clusters is None else n_clusters
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if k > num_samples:
        raise ValueError(f"n_clusters={k} exceeds the number of samples ({num_samples})")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    from sklearn.cluster import KMeans

    normalised = torch.nn.functional.normalize(features.detach().float(), dim=1).cpu().numpy()
    model = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    clusters = model.fit_predict(normalised)
    return {**cluster_metrics(clusters.astype(np.int64), classes), "n_clusters": k}


def assignment_clustering(assignments_or_logits: Tensor, labels: Tensor,
                          num_clusters: int | None = None) -> dict[str, float | int]:
    """Clustering scores of prototype assignments.

    Each sample's cluster is its assigned prototype: either given directly as
    an integer tensor ``[N]``, or the arg-max over prototypes of a float
    ``[N, K]`` tensor of logits, similarities or probabilities. ``num_clusters``
    is K (taken from the ``[N, K]`` shape when not given); the Hungarian
    accuracy is included only when K equals the number of classes.

    Returns:
        ``{"nmi", "ami", "ari", "clusters_used"[, "acc"]}`` where ``clusters_used`` is
        the number of distinct prototypes that received at least one sample
        (a collapse symptom when much smaller than ``K``).
    """
    if not isinstance(assignments_or_logits, Tensor):
        raise ValueError(
            f"assignments_or_logits must be a torch.Tensor, got {type(assignments_or_logits).__name__}"
        )
    if assignments_or_logits.is_floating_point():
        if assignments_or_logits.dim() != 2:
            raise ValueError(
                "float assignments_or_logits must have shape [N, K], "
                f"got {tuple(assignments_or_logits.shape)}"
            )
        if assignments_or_logits.shape[1] == 0:
            raise ValueError("assignments_or_logits has zero prototypes (K == 0)")
        clusters = assignments_or_logits.argmax(dim=1)
        num_clusters = int(assignments_or_logits.shape[1]) if num_clusters is None else num_clusters
    else:
        clusters = assignments_or_logits
    cluster_ids, classes = _check_pair(clusters, labels)
    accuracy = num_clusters is not None and num_clusters == int(np.unique(classes).size)
    return {**cluster_metrics(cluster_ids, classes, accuracy=accuracy),
            "clusters_used": int(np.unique(cluster_ids).size)}
