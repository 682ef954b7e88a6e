"""Evaluation of frozen features: k-NN, linear probe, clustering and long-tail breakdowns, and
an online k-NN and linear probe fed from the training loop (:class:`OnlineProbe`).

All functions take torch tensors (features ``[N, D]`` float, labels ``[N]``
int64) and run on the inputs' device.
"""

from nocollapse.evaluation.clustering import (
    assignment_clustering,
    cluster_metrics,
    hungarian_accuracy,
    kmeans_clustering,
)
from nocollapse.evaluation.knn import KNN_PROTOCOLS, knn_accuracy, knn_protocols, weighted_knn_predict
from nocollapse.evaluation.linear import linear_probe
from nocollapse.evaluation.longtail import frequency_groups, grouped_accuracy, per_class_accuracy
from nocollapse.evaluation.online import OnlineProbe

__all__ = [
    "KNN_PROTOCOLS",
    "OnlineProbe",
    "assignment_clustering",
    "cluster_metrics",
    "frequency_groups",
    "grouped_accuracy",
    "hungarian_accuracy",
    "kmeans_clustering",
    "knn_accuracy",
    "knn_protocols",
    "linear_probe",
    "per_class_accuracy",
    "weighted_knn_predict",
]
