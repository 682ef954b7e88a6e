"""Accuracy broken down by class frequency, for long-tailed datasets.

Classes are grouped by their number of *training* samples ``n_c`` following
the many/medium/few-shot convention of the long-tailed recognition literature
(Liu et al., 2019, "Large-Scale Long-Tailed Recognition in an Open World";
the same thresholds are used for CIFAR-10/100-LT and ImageNet-LT):

* ``head``   (many-shot):   ``n_c > many_threshold``            (default > 100)
* ``medium`` (medium-shot): ``few_threshold <= n_c <= many_threshold`` (20..100)
* ``tail``   (few-shot):    ``n_c < few_threshold``             (default < 20)

The accuracy of a group is the mean of the per-class accuracies of its
classes, so every class weighs the same whatever its test-set size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GROUPS", "frequency_groups", "grouped_accuracy", "per_class_accuracy"]

#: Group names, from most to least frequent.
GROUPS: tuple[str, str, str] = ("head", "medium", "tail")


def _counts_list(train_class_counts: Tensor | Sequence[int]) -> list[int]:
    if isinstance(train_class_counts, Tensor):
        if train_class_counts.dim() != 1:
            raise ValueError(
                f"train_class_counts must be 1-D, got shape {tuple(train_class_counts.shape)}"
            )
        if train_class_counts.is_floating_point() and not bool(
            (train_class_counts == train_class_counts.round()).all()
        ):
            raise ValueError("train_class_counts must hold whole numbers")
        counts = [int(c) for c in train_class_counts.tolist()]
    else:
        counts = []
        for c in train_class_counts:
            if isinstance(c, bool) or int(c) != c:
                raise ValueError(f"train_class_counts must hold whole numbers, got {c!r}")
            counts.append(int(c))
    if not counts:
        raise ValueError("train_class_counts is empty: give one count per class")
    if min(counts) < 0:
        raise ValueError(f"train_class_counts must be non-negative, got {min(counts)}")
    return counts


def frequency_groups(
    train_class_counts: Tensor | Sequence[int],
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, list[int]]:
    """Split class indices into head / medium / tail by training-set frequency.

    Class ``c`` with ``n_c`` training samples is ``head`` if
    ``n_c > many_threshold``, ``tail`` if ``n_c < few_threshold`` and
    ``medium`` otherwise (``few_threshold <= n_c <= many_threshold``).
    Classes with no training sample are tail. Groups may be empty.

    Returns:
        ``{"head": [...], "medium": [...], "tail": [...]}``, sorted class indices.
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})"
        )
    counts = _counts_list(train_class_counts)
    groups: dict[str, list[int]] = {name: [] for name in GROUPS}
    for cls, count in enumerate(counts):
        if count > many_threshold:
            groups["head"].append(cls)
        elif count < few_threshold:
            groups["tail"].append(cls)
        else:
            groups["medium"].append(cls)
    return groups


def _check_predictions(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Validate and return integer predictions (arg-max of ``[N, C]`` scores if 2-D)."""
    if not isinstance(predictions, Tensor) or not isinstance(labels, Tensor):
        raise ValueError("predictions and labels must be torch tensors")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if predictions.dim() == 2:
        if predictions.shape[1] != num_classes:
            raise ValueError(
                f"score predictions have {predictions.shape[1]} columns but num_classes={num_classes}"
            )
        predictions = predictions.argmax(dim=1)
    if predictions.dim() != 1 or labels.dim() != 1:
        raise ValueError(
            "predictions must be [N] class ids or [N, C] scores and labels [N], got "
            f"{tuple(predictions.shape)} and {tuple(labels.shape)}"
        )
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must be integer class ids, got {values.dtype}")
    if predictions.numel() != labels.numel():
        raise ValueError(
            f"predictions has {predictions.numel()} entries but labels has {labels.numel()}"
        )
    if labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return predictions


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class: ``acc_c = #{i : y_i = c, p_i = c} / #{i : y_i = c}``.

    ``predictions`` are ``[N]`` class ids or ``[N, C]`` scores (arg-max is
    taken). Returns a float ``[num_classes]`` tensor on the labels' device,
    NaN for classes absent from ``labels``.
    """
    predictions = _check_predictions(predictions, labels, num_classes)
    labels = labels.long()
    correct = (predictions.to(labels.device).long() == labels).double()
    totals = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    hits.scatter_add_(0, labels, correct)
    accuracy = hits / totals  # 0 / 0 -> NaN for absent classes
    return accuracy.float()


def grouped_accuracy(
    predictions: Tensor,
    labels: Tensor,
    train_class_counts: Tensor | Sequence[int],
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, float | int | None]:
    """Head / medium / tail accuracy on a long-tailed dataset.

    Groups come from :func:`frequency_groups` on the training counts (one per
    class, which fixes ``num_classes``). Each group's accuracy is the mean of
    :func:`per_class_accuracy` over its classes present in the test set.

    Returns:
        ``head``, ``medium``, ``tail``: group accuracy, or ``None`` when the group
        is empty (or none of its classes occur in the test set);
        ``overall``: plain sample accuracy ``(1/N) sum_i [p_i == y_i]``;
        ``mean_per_class``: mean per-class (balanced) accuracy over classes present;
        ``num_head``, ``num_medium``, ``num_tail``: number of classes per group.
    """
    counts = _counts_list(train_class_counts)
    num_classes = len(counts)
    predictions = _check_predictions(predictions, labels, num_classes)
    if labels.numel() == 0:
        raise ValueError("labels is empty: accuracy is undefined without test samples")
    groups = frequency_groups(counts, many_threshold, few_threshold)
    per_class = per_class_accuracy(predictions, labels, num_classes).double().cpu()
    result: dict[str, float | int | None] = {}
    for name in GROUPS:
        values = per_class[groups[name]] if groups[name] else per_class.new_empty(0)
        present = values[~torch.isnan(values)]
        result[name] = float(present.mean()) if present.numel() > 0 else None
    result["overall"] = float((predictions.to(labels.device).long() == labels.long()).double().mean())
    present_all = per_class[~torch.isnan(per_class)]
    result["mean_per_class"] = float(present_all.mean())
    for name in GROUPS:
        result[f"num_{name}"] = len(groups[name])
    return result
