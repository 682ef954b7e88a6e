"""Offline linear probe on frozen features.

Protocol of :func:`linear_probe`:

1. Split a stratified, seeded validation part (``val_fraction`` of every
   class, at least one training sample kept per class) off the training
   features.
2. Standardise features with the mean and standard deviation of the part
   being fitted: ``x' = (x - mean_fit) / std_fit`` per dimension (dimensions
   with ``std < 1e-6`` are only centred). Validation and test features are
   transformed with the same statistics, never their own.
3. For every ``(lr, weight_decay)`` of the sweep, fit a multinomial logistic
   regression ``logits = x' W + b`` minimising

       (1/B) sum_i CE(logits_i, y_i) + (weight_decay / 2) * ||W||^2

   with Adam (betas 0.9/0.999, L2 penalty on ``W`` only, not on ``b``),
   mini-batches of ``batch_size`` shuffled each epoch, zero initialisation
   and a per-step cosine learning-rate decay from ``lr`` to 0 over
   ``epochs`` epochs (more when needed to reach ``min_steps`` steps). All
   sweep configurations are trained together, each with its own parameters and
   Adam parameter group, on the same batches.
4. Pick the configuration with the best validation top-1 (ties go to the
   earliest in sweep order: ``lrs`` outer loop, ``weight_decays`` inner).
5. Refit on the whole training split with the chosen configuration and
   report test top-1 and top-5.

Adam with a coupled L2 penalty is used rather than SGD because standardised
self-supervised features are often strongly correlated; Adam's per-coordinate
scaling makes the same learning rates work across backbones, and the penalty
keeps ``weight_decay`` meaning the same objective whatever the schedule.
Everything runs on tensors (no DataLoader) and is deterministic given the seed
on a fixed device and thread count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["linear_probe", "stratified_split"]

_STD_EPS = 1e-6


def _check_inputs(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor
) -> None:
    for name, features in (("train_features", train_features), ("test_features", test_features)):
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{name} must be a float tensor of shape [N, D], got {shape}")
    for name, labels, features_name, features in (
        ("train_labels", train_labels, "train_features", train_features),
        ("test_labels", test_labels, "test_features", test_features),
    ):
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"{name} must be a 1-D integer tensor, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
        if labels.numel() != features.shape[0]:
            raise ValueError(
                f"{name} has {labels.numel()} entries but {features_name} has {features.shape[0]} rows"
            )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty: the linear probe needs training samples")
    if test_features.shape[0] == 0:
        raise ValueError("test_features is empty: accuracy is undefined without test samples")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            "train_features and test_features have different feature dimensions: "
            f"{train_features.shape[1]} vs {test_features.shape[1]}"
        )
    low = min(int(train_labels.min()), int(test_labels.min()))
    if low < 0:
        raise ValueError(f"labels must be non-negative class indices, got {low}")


def _check_positive_values(name: str, values: Sequence[float], allow_zero: bool) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} is empty: give at least one value")
    for v in values:
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"every value of {name} must be finite and {bound}, got {v}")
    return values


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of sample indices into (fit, validation).

    Each class with ``n_c`` samples sends ``min(round(val_fraction * n_c), n_c - 1)``
    randomly chosen samples to validation, so every class keeps at least one
    training sample. Returns two sorted int64 index tensors on ``labels.device``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels_cpu = labels.detach().long().cpu()
    fit_parts, val_parts = [], []
    for cls in torch.unique(labels_cpu).tolist():
        idx = (labels_cpu == cls).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_val = min(int(round(val_fraction * idx.numel())), idx.numel() - 1)
        val_parts.append(idx[:n_val])
        fit_parts.append(idx[n_val:])
    fit = torch.cat(fit_parts).sort().values.to(labels.device)
    val = torch.cat(val_parts).sort().values.to(labels.device)
    return fit, val


def _standardizer(features: Tensor, enabled: bool) -> tuple[Tensor, Tensor]:
    """Per-dimension (mean, std) of ``features``; identity transform when disabled."""
    if not enabled:
        dim = features.shape[1]
        return features.new_zeros(dim), features.new_ones(dim)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    std = torch.where(std < _STD_EPS, torch.ones_like(std), std)
    return mean, std


def _fit_linear(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    configs: list[tuple[float, float]],
    epochs: int,
    batch_size: int,
    seed: int,
    min_steps: int = 0,
) -> tuple[Tensor, Tensor]:
    """Train one linear classifier per (lr, weight_decay) config on shared batches.

    Each config owns its weight ``[D, C]`` and bias ``[C]`` in its own ``torch.optim.Adam``
    parameter group (its learning rate); one step evaluates all of them on the same batch and
    minimises ``sum_g [CE_g + weight_decay_g / 2 * ||W_g||^2]``, the configs being independent.
    A ``LambdaLR`` applies the per-step cosine decay ``0.5 * (1 + cos(pi * t / T))``.
    Runs ``max(epochs, ceil(min_steps / steps_per_epoch))`` epochs.

    Returns weights ``[G, D, C]`` and biases ``[G, C]``.
    """
    num_samples, dim = features.shape
    device, dtype = features.device, features.dtype
    weights = [torch.zeros(dim, num_classes, device=device, dtype=dtype, requires_grad=True) for _ in configs]
    biases = [torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True) for _ in configs]
    optimizer = torch.optim.Adam(
        [{"params": [w, b], "lr": lr} for (lr, _), w, b in zip(configs, weights, biases)],
        betas=(0.9, 0.999), eps=1e-8)
    decays = [wd for _, wd in configs]

    steps_per_epoch = math.ceil(num_samples / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total_steps)))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator).to(device)
        for start in range(0, num_samples, batch_size):
            idx = order[start : start + batch_size]
            x, y = features[idx], labels[idx]
            logits = torch.einsum("nd,gdc->ngc", x, torch.stack(weights)) + torch.stack(biases)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, len(configs)),
                                                     reduction="none").mean(0).sum()
            loss = loss + sum(wd / 2 * (w * w).sum() for wd, w in zip(decays, weights) if wd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return torch.stack(weights).detach(), torch.stack(biases).detach()


def _topk_hits(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    top = min(5, logits.shape[-1])
    ranked = logits.topk(top, dim=-1).indices
    hits = ranked == labels[:, None]
    return float(hits[:, 0].float().mean()), float(hits.any(dim=1).float().mean())


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    lrs: Sequence[float] = (1e-3, 1e-2),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    val_fraction: float = 0.1,
    epochs: int = 20,
    batch_size: int = 512,
    min_steps: int = 1000,
    seed: int = 0,
    standardize: bool = True,
    num_classes: int | None = None,
    return_predictions: bool = False,
) -> dict:
    """Linear-probe accuracy of frozen features with a small validated sweep.

    See the module docstring for the full protocol (stratified validation
    split, standardisation with fit-set statistics, Adam + L2 penalty +
    cosine decay, selection by validation top-1, refit on the full train
    split). ``top5`` uses the ``min(5, C)`` highest logits.

    Args:
        lrs, weight_decays: the sweep is their Cartesian product.
        val_fraction: share of each class held out for selection. With a
            single configuration it may be 0, which skips validation.
        epochs, batch_size: optimisation length and mini-batch size.
        min_steps: lower bound on the number of optimisation steps; small
            training sets get more epochs so that they are not under-fitted
            (each fit runs ``max(epochs, ceil(min_steps / steps_per_epoch))``
            epochs; with the defaults, sets above ~25,000 samples are unaffected).
        seed: seeds the split and the batch order.
        standardize: apply per-dimension standardisation (recommended).
        num_classes: defaults to ``max(train_labels.max(), test_labels.max()) + 1``.
        return_predictions: also return ``predictions``, the ``[N_test]``
            arg-max class of the refitted probe (e.g. for
            :func:`nocollapse.evaluation.longtail.grouped_accuracy`).

    Returns:
        ``{"top1", "top5", "best_lr", "best_weight_decay", "val_top1", "sweep"}``
        where ``sweep`` lists ``{"lr", "weight_decay", "val_top1"}`` per
        configuration (``val_top1`` is ``None`` when validation was skipped),
        plus ``"predictions"`` when requested.
    """
    _check_inputs(train_features, train_labels, test_features, test_labels)
    lr_values = _check_positive_values("lrs", lrs, allow_zero=False)
    wd_values = _check_positive_values("weight_decays", weight_decays, allow_zero=True)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be an integer >= 0, got {min_steps!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    configs = [(lr, wd) for lr in lr_values for wd in wd_values]
    if val_fraction == 0.0 and len(configs) > 1:
        raise ValueError("val_fraction must be > 0 to select among several (lr, weight_decay) configs")

    device = train_features.device
    dtype = torch.float64 if train_features.dtype == torch.float64 else torch.float32
    x_train = train_features.detach().to(dtype)
    y_train = train_labels.detach().to(device=device, dtype=torch.long)
    x_test = test_features.detach().to(device=device, dtype=dtype)
    y_test = test_labels.detach().to(device=device, dtype=torch.long)
    classes = num_classes if num_classes is not None else int(max(y_train.max(), y_test.max())) + 1
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    largest = int(max(y_train.max(), y_test.max()))
    if largest >= classes:
        raise ValueError(f"labels contain class {largest} but num_classes={classes}")

    sweep: list[dict] = []
    best_index, best_val = 0, None
    if val_fraction > 0.0:
        fit_idx, val_idx = stratified_split(y_train, val_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError(
                "the validation split is empty: increase val_fraction or provide more training samples"
            )
        mean, std = _standardizer(x_train[fit_idx], standardize)
        x_fit, x_val = (x_train[fit_idx] - mean) / std, (x_train[val_idx] - mean) / std
        weights, biases = _fit_linear(
            x_fit, y_train[fit_idx], classes, configs, epochs, batch_size, seed, min_steps
        )
        with torch.no_grad():
            for g, (lr, wd) in enumerate(configs):
                val_top1, _ = _topk_hits(x_val @ weights[g] + biases[g], y_train[val_idx])
                sweep.append({"lr": lr, "weight_decay": wd, "val_top1": val_top1})
                if best_val is None or val_top1 > best_val:
                    best_index, best_val = g, val_top1
    else:
        sweep = [{"lr": lr, "weight_decay": wd, "val_top1": None} for lr, wd in configs]

    best_lr, best_wd = configs[best_index]
    mean, std = _standardizer(x_train, standardize)
    weights, biases = _fit_linear(
        (x_train - mean) / std, y_train, classes, [(best_lr, best_wd)], epochs, batch_size, seed, min_steps
    )
    with torch.no_grad():
        logits = ((x_test - mean) / std) @ weights[0] + biases[0]
        top1, top5 = _topk_hits(logits, y_test)
    result: dict = {
        "top1": top1,
        "top5": top5,
        "best_lr": best_lr,
        "best_weight_decay": best_wd,
        "val_top1": best_val,
        "sweep": sweep,
    }
    if return_predictions:
        result["predictions"] = logits.argmax(dim=1)
    return result
