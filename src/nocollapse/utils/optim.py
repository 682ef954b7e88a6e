"""Optimisers (AdamW, Adam, SGD, LARS) with parameter groups that exempt biases and norm layers from
weight decay; learning rate and weight decay are set every step from the schedules."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017).

    For every parameter with more than one dimension (weights; biases and norm gains are exempt)
    the update direction ``d = g + wd * w`` is rescaled by

        r = eta * ||w|| / ||d||      (r = 1 when either norm is 0),

    then ``v <- momentum * v + r * d`` and ``w <- w - lr * v``: the layer's learning rate is
    ``lr * r``.

    With ``clip_lr`` (the clip mode of apex's LARC, which solo-learn's CIFAR recipes use) the
    layer's learning rate is ``min(r, lr)`` instead: the trust ratio itself, never more than the
    global rate. The difference matters for a layer whose gradient is small against its weights,
    such as K prototypes of which a batch moves a few: there ``r`` is large, and ``lr * r`` moves
    the whole matrix by ``lr * eta * ||w||`` at every step, however little the loss asks for.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.02, clip_lr: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      clip_lr=clip_lr))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    if group.get("clip_lr", False) and group["lr"] > 0:
                        # the step below multiplies by lr: scale so that the layer's rate is min(r, lr)
                        ratio = torch.clamp(ratio / group["lr"], max=1.0)
                    d = d.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Two groups: weights (decayed) and biases / norm parameters (never decayed)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "apply_weight_decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: Any, groups: list[dict], peak_lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser an ``optim.*`` section names (``name``, ``lr``, ``betas``, ``momentum``, ...).

    With ``decay_norms_and_biases`` every group is decayed, the groups' exemptions ignored. A group
    flagged ``"fixed_lr": True`` (SimSiam's predictor) gets the learning rate ``peak_lr`` (the peak
    of the schedule; ``cfg.lr`` when None) and keeps it: :func:`set_hyperparameters` does not
    schedule it."""
    if getattr(cfg, "decay_norms_and_biases", False):
        merged: dict[bool, list] = {}
        for g in groups:
            merged.setdefault(bool(g.get("fixed_lr", False)), []).extend(g["params"])
        groups = [{"params": params, "apply_weight_decay": True, **({"fixed_lr": True} if fixed else {})}
                  for fixed, params in merged.items()]
    fixed = cfg.lr if peak_lr is None else peak_lr
    groups = [{**g, "lr": fixed} if g.get("fixed_lr", False) else g for g in groups]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    eta=cfg.lars_eta, clip_lr=getattr(cfg, "lars_clip_lr", False))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's learning rate and weight decay; a group flagged ``fixed_lr`` keeps its lr."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay
