"""The evaluation suite of ``nocollapse eval``: k-NN (both protocols), linear probe, clustering
and the long-tail breakdown, from frozen train / test outputs of a model."""

from __future__ import annotations

from typing import Any

import torch

from ..diagnostics.clusters import cluster_size_stats, intracluster_variance_ratio
from .clustering import assignment_clustering, kmeans_clustering
from .knn import KNN_PROTOCOLS, knn_protocol_key, knn_protocols, weighted_knn_predict
from .linear import linear_probe
from .longtail import grouped_accuracy


def evaluate(train, test, num_classes: int, train_class_counts: list[int], *, knn: bool = True,
             linear: bool = True, clustering: bool = True, linear_lrs=(1e-3, 1e-2),
             linear_weight_decays=(0.0, 1e-4, 1e-3), linear_epochs: int = 20, many_threshold: int = 100,
             few_threshold: int = 20, seed: int = 0, num_prototypes: int | None = None) -> dict[str, Any]:
    """``train`` / ``test`` carry ``features``, ``labels`` and optionally ``assigned`` (each test
    sample's arg-max prototype) with ``num_prototypes``; returns a JSON-serialisable dict with a section per requested evaluation."""
    result: dict[str, Any] = {"num_train": int(train.labels.numel()), "num_test": int(test.labels.numel()),
                              "feature_dim": int(train.features.shape[1])}
    groups = dict(train_class_counts=train_class_counts, many_threshold=many_threshold,
                  few_threshold=few_threshold)
    if knn:
        result["knn"] = knn_protocols(train.features, train.labels, test.features, test.labels,
                                      num_classes=num_classes)
        k, t = KNN_PROTOCOLS["dino"]
        scores = weighted_knn_predict(train.features, train.labels, test.features, num_classes, k, t)
        result["knn"][knn_protocol_key(k, t)]["long_tail"] = grouped_accuracy(
            scores.argmax(1), test.labels, **groups)
    if linear:
        probe = linear_probe(train.features, train.labels, test.features, test.labels, lrs=linear_lrs,
                             weight_decays=linear_weight_decays, epochs=linear_epochs, seed=seed,
                             num_classes=num_classes, return_predictions=True)
        predictions = probe.pop("predictions")
        probe["long_tail"] = grouped_accuracy(predictions, test.labels, **groups)
        result["linear"] = probe
    if clustering:
        result["clustering"] = {"kmeans": kmeans_clustering(test.features, test.labels,
                                                            n_clusters=num_classes, seed=seed)}
        if getattr(test, "assigned", None) is not None:
            argmax = assignment_clustering(test.assigned, test.labels, num_clusters=num_prototypes)
            if num_prototypes:
                argmax["sizes"] = cluster_size_stats(test.assigned, num_prototypes)
                if getattr(test, "embeddings", None) is not None:
                    argmax["intracluster_variance_ratio"] = intracluster_variance_ratio(test.embeddings, test.assigned)
            result["clustering"]["prototype_argmax"] = argmax
    return _plain(result)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj
