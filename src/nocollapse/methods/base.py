"""The thin template every method follows.

A method is an ``nn.Module`` that owns its student (and, for self-distillation, an EMA teacher)
and turns a list of augmented crops into a loss:

* ``forward(crops, step) -> StepOutput``: the loss plus detached tensors the collapse monitor
  reads (teacher probabilities, embeddings) and scalars to log.
* ``parameter_groups()``: what the optimiser trains (weights decayed, biases and norms not).
* ``on_after_backward(step)``: e.g. cancel the gradient of learned prototypes while frozen.
* ``on_after_optimizer_step(step)``: e.g. the EMA teacher update.
* ``eval_backbone()``: the network whose features evaluation uses.
* ``prototype_vectors()``: the ``[K, D]`` prototypes, for methods that have them.

The engine wraps the whole method in DistributedDataParallel, so everything a step needs runs
inside ``forward``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config
from ..engine.optim import parameter_groups
from ..engine.schedules import cosine_schedule
from ..models.heads import ProjectionMLP


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    teacher_probs: torch.Tensor | None = None   # [B, K] targets of the first global view
    student_probs: torch.Tensor | None = None   # [B, K] predictions for the second global view
    embeddings: torch.Tensor | None = None      # [B, D] teacher bottleneck embeddings
    features: torch.Tensor | None = None        # [B, F] teacher backbone features


class Encoder(nn.Module):
    """Backbone followed by a projection MLP; optionally L2-normalises the bottleneck.

    ``forward`` takes a list of crops and runs consecutive crops of equal size as one batch (so
    BatchNorm sees all global crops together, as in DINO's multi-crop wrapper)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.normalize = normalize

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        features = torch.cat(feats)
        embedding = self.projector(features)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return features, embedding


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter."""
    with torch.no_grad():
        t_params = [p for p in teacher.parameters()]
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class SSLMethod(nn.Module):
    """Base class: schedules common to all methods and default hook implementations."""

    name = "base"

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self.feature_dim = int(getattr(backbone, "feature_dim"))

    # ---- helpers -------------------------------------------------------------------------
    def epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def momentum_schedule(self) -> np.ndarray:
        m = self.cfg.method
        return cosine_schedule(m.teacher_momentum, m.teacher_momentum_end, self.total_steps)

    def build_encoder(self, backbone: nn.Module, normalize: bool) -> Encoder:
        projector = ProjectionMLP.from_config(self.feature_dim, self.cfg.method.head)
        return Encoder(backbone, projector, normalize)

    @staticmethod
    def frozen_copy(module: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(module)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    # ---- hooks ---------------------------------------------------------------------------
    def forward(self, crops: Sequence[torch.Tensor], step: int) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        return parameter_groups(self.named_parameters())

    def on_after_backward(self, step: int) -> None:
        return None

    def on_after_optimizer_step(self, step: int) -> None:
        return None

    def eval_backbone(self) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def prototype_vectors(self) -> torch.Tensor | None:
        return None

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Prototype scores ``[N, K]`` of evaluation-time embeddings (None without prototypes)."""
        return None

    def assignment_probs(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """The method's assignment distribution ``[N, K]`` of evaluation-time embeddings."""
        return None

    def uniform_loss(self) -> float | None:
        """The loss value of a fully collapsed, uniform-assignment model (for the alarm)."""
        return None

    def eval_encoder(self) -> Encoder | None:
        return None
