"""Learned prototypes: a trainable, bias-free last layer (DINO, CARP, SwAV).

Two ways keep the rows at unit norm, as the methods' reference code does:

* ``normalization="weight_norm"`` (DINO's ``norm_last_layer``): ``W_k = g_k v_k / ||v_k||`` with
  the gains g fixed to 1 (or trained, with ``norm_fixed=False``); the gradient never changes a
  row's norm.
* ``normalization="renormalize"`` (SwAV): a plain weight whose rows are rescaled to unit norm at
  construction and after every optimiser step.

With ``ema_teacher`` the set also holds a frozen teacher copy that follows the trained layer by
an exponential moving average; targets are scored against the copy (:meth:`target_scores`) and
the reports read it (:meth:`vectors`). ``freeze_steps``: the gradient of the prototypes is
dropped for that many first steps (DINO's frozen last layer, SwAV's frozen prototypes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from .base import PrototypeSet

NORMALIZATIONS = ("weight_norm", "renormalize")


class PrototypeLayer(nn.Module):
    """K prototypes as a bias-free linear layer: ``scores = z @ W^T`` (see the module doc for the
    two normalisations)."""

    def __init__(self, dim: int, num_prototypes: int, norm_fixed: bool = True,
                 normalization: str = "weight_norm", init: str = "trunc_normal") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        layer = nn.Linear(dim, num_prototypes, bias=False)
        if init == "trunc_normal":
            nn.init.trunc_normal_(layer.weight, std=0.02)
        self.normalization = normalization
        if normalization == "weight_norm":
            self.layer = weight_norm(layer)
            gain = self.layer.parametrizations.weight.original0
            with torch.no_grad():
                gain.fill_(1.0)
            if norm_fixed:
                gain.requires_grad_(False)
        else:
            self.layer = layer
            self.renormalize()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer(z)

    @property
    def num_prototypes(self) -> int:
        """K, the layer's outputs."""
        return self.layer.out_features

    def vectors(self) -> torch.Tensor:
        """The prototypes as rows ``[K, D]`` (the effective weight)."""
        return self.layer.weight

    @torch.no_grad()
    def renormalize(self) -> None:
        """Rescale every row to unit norm in place (``normalization="renormalize"`` only)."""
        if self.normalization == "renormalize":
            self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))


class LearnedPrototypes(PrototypeSet):
    """Trainable prototypes, optionally with an EMA teacher copy (see the module doc)."""

    kind = "learned"

    def __init__(self, dim: int, num_prototypes: int, *, norm_fixed: bool = True,
                 normalization: str = "weight_norm", init: str = "trunc_normal", ema_teacher: bool = False,
                 freeze_steps: int = 0) -> None:
        super().__init__()
        if freeze_steps < 0:
            raise ValueError(f"freeze_steps must be >= 0, got {freeze_steps}")
        self.dim = dim
        self.student = PrototypeLayer(dim, num_prototypes, norm_fixed, normalization, init)
        self.teacher: PrototypeLayer | None = None
        if ema_teacher:
            self.teacher = copy.deepcopy(self.student)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.freeze_steps = freeze_steps

    @property
    def num_prototypes(self) -> int:
        """K, the number of prototypes."""
        return self.student.num_prototypes

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.student(z)

    def target_scores(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher or self.student)(z)

    def vectors(self) -> torch.Tensor:
        return (self.teacher or self.student).vectors().detach()

    def product_factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, self.student.vectors()

    def ordered_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        # the prototype rows are gathered (K x D, with a K x D scatter in the backward pass)
        # rather than the scores (N x K)
        return F.linear(z, self.student.vectors().index_select(0, order))

    def ordered_target_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(z, (self.teacher or self.student).vectors().index_select(0, order))

    def trainable_vectors(self) -> torch.Tensor:
        return self.student.vectors()

    def after_backward(self, step: int) -> None:
        if step < self.freeze_steps:
            for p in self.student.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, teacher_momentum: float | None = None) -> None:
        self.student.renormalize()
        if self.teacher is not None:
            if teacher_momentum is None:
                raise ValueError("learned prototypes with an EMA teacher need the teacher momentum")
            t_params = list(self.teacher.parameters())
            torch._foreach_mul_(t_params, teacher_momentum)
            torch._foreach_add_(t_params, [p.detach() for p in self.student.parameters()],
                                alpha=1.0 - teacher_momentum)

    def extra_repr(self) -> str:
        return (f"num_prototypes={self.num_prototypes}, dim={self.dim}, ema_teacher={self.teacher is not None}, "
                f"freeze_steps={self.freeze_steps}")
