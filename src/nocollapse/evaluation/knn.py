"""Weighted k-nearest-neighbour evaluation of frozen features.

Protocol (the non-parametric classifier of Wu et al., 2018, "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination"):

1. L2-normalise the train and test features, so that the dot product of two
   feature vectors is their cosine similarity ``s``.
2. For every test sample keep its ``k`` most similar training samples.
3. Each neighbour ``j`` votes for its own label with weight
   ``w_j = exp(s_j / T)``; the score of class ``c`` is

       score_c(x) = sum_{j in topk(x)} exp(s_j / T) * [y_j == c]

4. The prediction is ``argmax_c score_c(x)``.

Two settings are common in the literature and both are provided by
:func:`knn_protocols`: ``k=20, T=0.07`` (DINO) and ``k=200, T=0.1`` (lightly).

The similarity matrix is computed one block of test rows at a time, so memory
stays bounded (a block holds ``chunk_size * num_train`` similarities) even for
50,000 training and 10,000 test samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "KNN_PROTOCOLS",
    "default_chunk_size",
    "knn_accuracy",
    "knn_protocol_key",
    "knn_protocols",
    "weighted_knn_predict",
]

#: Named (k, temperature) settings: DINO uses k=20, T=0.07; lightly k=200, T=0.1.
KNN_PROTOCOLS: dict[str, tuple[int, float]] = {"dino": (20, 0.07), "lightly": (200, 0.1)}

#: Upper bound, in bytes, of one block of the similarity matrix when the chunk
#: size is chosen automatically (256 MiB).
DEFAULT_CHUNK_BYTES: int = 256 * 1024 * 1024


def _check_features(name: str, features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")


def _check_labels(name: str, labels: Tensor, num_samples: int, features_name: str) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.numel() != num_samples:
        raise ValueError(
            f"{name} has {labels.numel()} entries but {features_name} has {num_samples} rows"
        )
    if labels.numel() > 0 and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got {int(labels.min())}")


def _check_k_temperature(k: int, temperature: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def default_chunk_size(num_train: int, bytes_per_element: int = 4) -> int:
    """Test rows per block used when ``chunk_size=None``.

    The largest row count whose ``[rows, num_train]`` similarity block fits in
    :data:`DEFAULT_CHUNK_BYTES` (256 MiB), at least 1.
    """
    return max(1, DEFAULT_CHUNK_BYTES // max(1, num_train * bytes_per_element))


def _score_dtype(device: torch.device) -> torch.dtype:
    # exp(1 / T) overflows float32 for T < ~0.0113, so the votes are accumulated
    # in float64 wherever the device supports it (MPS does not).
    return torch.float32 if device.type == "mps" else torch.float64


def _knn_scores_multi(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    settings: list[tuple[int, float]],
    chunk_size: int | None,
) -> list[Tensor]:
    """Class scores for several (k, T) settings sharing one pass over the similarities.

    The neighbours of the largest k are found once per block; since ``topk``
    returns them sorted, the first ``k'`` of them are the top-``k'`` for any
    smaller ``k'``. Returns one ``[N_test, num_classes]`` tensor per setting.
    """
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    num_train = train_features.shape[0]
    if num_train == 0:
        raise ValueError("train_features is empty: k-NN needs at least one training sample")
    _check_labels("train_labels", train_labels, num_train, "train_features")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            "train_features and test_features have different feature dimensions: "
            f"{train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"train_labels contains class {int(train_labels.max())} but num_classes={num_classes}"
        )
    for k, temperature in settings:
        _check_k_temperature(k, temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_train)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")

    device = train_features.device
    half = train_features.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if half else train_features.dtype
    score_dtype = _score_dtype(device)
    train = F.normalize(train_features.to(compute_dtype), dim=1)
    train_t = train.t()
    labels = train_labels.to(device=device, dtype=torch.long)
    clamped = [(min(k, num_train), float(t)) for k, t in settings]
    k_max = max(k for k, _ in clamped)

    num_test = test_features.shape[0]
    outputs = [torch.zeros(num_test, num_classes, dtype=score_dtype, device=device) for _ in settings]
    for start in range(0, num_test, chunk_size):
        block = test_features[start : start + chunk_size].to(device=device, dtype=compute_dtype)
        similarity = F.normalize(block, dim=1) @ train_t  # [rows, num_train]
        top_sim, top_idx = similarity.topk(k_max, dim=1, largest=True, sorted=True)
        del similarity
        top_labels = labels[top_idx]  # [rows, k_max]
        top_sim = top_sim.to(score_dtype)
        for out, (k, temperature) in zip(outputs, clamped):
            weights = torch.exp(top_sim[:, :k] / temperature)
            out[start : start + block.shape[0]].scatter_add_(1, top_labels[:, :k], weights)
    return outputs


def weighted_knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> Tensor:
    """Class scores of the temperature-weighted k-NN classifier (Wu et al., 2018).

    With ``s_ij`` the cosine similarity between test sample ``i`` and training
    sample ``j`` (both L2-normalised), the score of class ``c`` is

        score_ic = sum_{j in topk_i} exp(s_ij / T) * [y_j == c]

    where ``topk_i`` are the ``k`` training samples most similar to test
    sample ``i``. ``k`` is clamped to the number of training samples.

    Args:
        train_features: ``[N_train, D]`` float features of the labelled bank.
        train_labels: ``[N_train]`` integer labels in ``[0, num_classes)``.
        test_features: ``[N_test, D]`` float features to classify.
        num_classes: number of classes ``C`` (columns of the output).
        k: number of neighbours (>= 1).
        temperature: ``T > 0`` of the exponential weights.
        chunk_size: test rows processed per block. ``None`` picks the largest
            block whose similarity matrix fits in 256 MiB of float32
            (1,342 rows for 50,000 training samples).

    Returns:
        ``[N_test, num_classes]`` scores on the device of ``train_features``,
        float64 (float32 on MPS) so that ``exp(1/T)`` does not overflow for
        small temperatures. Classes without a neighbour score 0.
    """
    return _knn_scores_multi(
        train_features, train_labels, test_features, num_classes, [(k, temperature)], chunk_size
    )[0]


def _resolve_num_classes(train_labels: Tensor, test_labels: Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    return int(max(int(train_labels.max()), int(test_labels.max()))) + 1


def _accuracy_from_scores(scores: Tensor, test_labels: Tensor) -> dict[str, float]:
    labels = test_labels.to(device=scores.device, dtype=torch.long)
    top = min(5, scores.shape[1])
    ranked = scores.topk(top, dim=1).indices  # [N, top], best first
    hits = ranked == labels[:, None]
    return {
        "top1": float(hits[:, 0].float().mean()),
        "top5": float(hits.any(dim=1).float().mean()),
    }


def _check_split(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor
) -> None:
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty: k-NN needs at least one training sample")
    if test_features.shape[0] == 0:
        raise ValueError("test_features is empty: accuracy is undefined without test samples")
    _check_labels("train_labels", train_labels, train_features.shape[0], "train_features")
    _check_labels("test_labels", test_labels, test_features.shape[0], "test_features")


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the weighted k-NN classifier.

    Scores come from :func:`weighted_knn_predict`. ``top1`` is the fraction of
    test samples whose highest-scoring class is the true label; ``top5`` the
    fraction whose true label is among the ``min(5, C)`` highest-scoring
    classes (so with fewer than 5 classes it is 1.0). Ties between classes
    are broken by ``torch.topk``.

    Args:
        num_classes: defaults to ``max(train_labels.max(), test_labels.max()) + 1``.
        Other arguments: see :func:`weighted_knn_predict`.

    Returns:
        ``{"top1": float, "top5": float}``, both in ``[0, 1]``.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    _check_k_temperature(k, temperature)
    classes = _resolve_num_classes(train_labels, test_labels, num_classes)
    if int(test_labels.max()) >= classes:
        raise ValueError(f"test_labels contains class {int(test_labels.max())} but num_classes={classes}")
    scores = weighted_knn_predict(
        train_features, train_labels, test_features, classes, k, temperature, chunk_size
    )
    return _accuracy_from_scores(scores, test_labels)


def knn_protocol_key(k: int, temperature: float) -> str:
    """Result key of one k-NN setting, e.g. ``knn_k20_t0.07`` or ``knn_k200_t0.1``."""
    return f"knn_k{k}_t{temperature:g}"


def knn_protocols(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    protocols: Mapping[str, tuple[int, float]] | None = None,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """Weighted k-NN accuracy under several (k, T) protocols in one pass.

    By default runs :data:`KNN_PROTOCOLS`: DINO's ``k=20, T=0.07`` and
    lightly's ``k=200, T=0.1``. The similarity matrix is computed once; the
    neighbours of the largest ``k`` are reused for the smaller ones.

    Returns:
        ``{knn_protocol_key(k, T): {"top1": float, "top5": float}}``, i.e. by
        default ``{"knn_k20_t0.07": {...}, "knn_k200_t0.1": {...}}``. The key
        records the requested ``k`` even when it was clamped to the number of
        training samples.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    chosen = dict(KNN_PROTOCOLS if protocols is None else protocols)
    if not chosen:
        raise ValueError("protocols is empty: give at least one (k, temperature) pair")
    for k, t in chosen.values():
        _check_k_temperature(k, t)
    settings = [(int(k), float(t)) for k, t in chosen.values()]
    classes = _resolve_num_classes(train_labels, test_labels, num_classes)
    if int(test_labels.max()) >= classes:
        raise ValueError(f"test_labels contains class {int(test_labels.max())} but num_classes={classes}")
    all_scores = _knn_scores_multi(
        train_features, train_labels, test_features, classes, settings, chunk_size
    )
    return {
        knn_protocol_key(k, t): _accuracy_from_scores(scores, test_labels)
        for (k, t), scores in zip(settings, all_scores)
    }
