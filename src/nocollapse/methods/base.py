"""The template every method follows, and the hooks through which the engine, the monitor, the
CLI and the analysis talk to a method (they never read a method's attributes).

A method is an ``nn.Module`` that owns its networks and turns a :class:`~nocollapse.data.batch.Batch`
into a loss. A subclass implements :meth:`SSLMethod.training_step` and
:meth:`SSLMethod.eval_backbone`, declares its settings, and registers itself::

    @dataclass
    class ToySettings:
        weight: float = setting(1.0, "weight of the toy loss", minimum=0.0)

    @METHODS.register("toy")
    class Toy(SSLMethod):
        @classmethod
        def settings(cls):
            return {**super().settings(), "toy": ToySettings}
        ...

Hooks (override what applies; the defaults fit a method without prototypes or teacher):

========================================  ====================================================
``settings()`` (classmethod)               config sections: ``{"toy": ToySettings}``; ``"method"``
                                           merges keys into ``method.*`` (see ``config.py``)
``inactive_settings(cfg)`` (classmethod)   own keys that do not apply under ``cfg``
``estimate_state_bytes(cfg, rows)``        memory of the method's state + scores (preflight)
``configure_for_data(cfg, num_classes)``    resolve dataset-dependent settings before building
``run_name(cfg)`` (classmethod)            the default run directory's prefix
``uses_labels`` (class attribute)          the engine passes labels only when it is True
``fixed_prototypes`` (class attribute)     prototypes never change and are distinct by construction
``training_step(batch, step)``             the loss and the tensors the monitor reads
``parameter_groups()``                     what the optimiser trains (biases / norms not decayed)
``on_after_backward(step)``                e.g. cancel the gradient of frozen prototypes
``on_after_optimizer_step(step)``          e.g. the EMA teacher update
``eval_backbone()`` / ``eval_encoder()``   the networks evaluation encodes with
``eval_network_name``                      what evaluation encodes with, for reports
``num_prototypes`` / ``embedding_dim``     sizes the monitor needs (None without prototypes)
``prototype_vectors()``                    ``[K, D]`` prototypes (None without prototypes)
``probs_from_scores(scores)``              the method's ``[N, K]`` assignment distribution, from
                                           its scores (``assignment_probs(embeddings)`` composes both)
``mixture_weights()`` / ``idle_prototypes()``  mixture weights and the idle mask, if any
``uniform_loss()``                         the loss of a collapsed model (for the alarm)
``summary_fields()``                       method facts for ``summary.json``
``describe()``                             a short label for plots and tables
``trainable_parameter_count()``            parameters the optimiser trains
========================================  ====================================================

The engine wraps the whole method in DistributedDataParallel, so everything a step needs runs
inside ``forward`` (which accepts a ``Batch`` or a plain list of crops and calls
``training_step``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config
from ..data.batch import Batch
from ..models.heads import ProjectionMLP
from ..utils.optim import parameter_groups


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    teacher_probs: torch.Tensor | None = None   # [B, K] targets of the first global view
    student_probs: torch.Tensor | None = None   # [B, K] predictions for the second global view
    embeddings: torch.Tensor | None = None      # [B, D] (teacher) bottleneck embeddings
    features: torch.Tensor | None = None        # [B, F] (teacher) backbone features


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


def build_encoder(backbone: nn.Module, head: Any, normalize: bool) -> Encoder:
    """``backbone`` followed by a projection MLP built from head settings (``hidden_dim``,
    ``bottleneck_dim``, ``layers``, ``batchnorm``)."""
    return Encoder(backbone, ProjectionMLP.from_config(int(getattr(backbone, "feature_dim")), head), normalize)


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter."""
    with torch.no_grad():
        t_params = [p for p in teacher.parameters()]
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters take no gradient (an EMA teacher)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class SSLMethod(nn.Module):
    """Base class: the hooks with defaults for a method without prototypes or teacher."""

    #: the registered name (set by the subclass, equal to its ``method.name``)
    name = "base"
    #: the engine passes ``batch.labels`` only to a method that declares it uses them
    uses_labels = False
    #: what evaluation encodes with, for reports (``"teacher backbone"`` for EMA-teacher methods)
    eval_network_name = "backbone"
    #: prototypes fixed and distinct by construction (a random codebook, orthonormal class
    #: prototypes): their uniqueness is not measured, their usage is
    fixed_prototypes = False

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self.feature_dim = int(getattr(backbone, "feature_dim"))

    # ---- configuration (class level: the config and the preflight use them) ----------------
    @classmethod
    def settings(cls) -> dict[str, type]:
        """Config sections of this method: section name -> dataclass (see ``nocollapse.config``)."""
        return {}

    @classmethod
    def inactive_settings(cls, cfg: Config) -> dict[str, str]:
        """Keys or sections of :meth:`settings` that do not apply under ``cfg``, each with the
        condition under which they would."""
        return {}

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        """Memory the method needs beyond the backbone for ``rows`` crops per step (preflight)."""
        return 0

    @classmethod
    def configure_for_data(cls, cfg: Config, num_classes: int) -> None:
        """Resolve settings that depend on the dataset (e.g. the number of class prototypes) in
        ``cfg`` before the method is built; the resolved config is what the run saves."""
        return None

    @classmethod
    def run_name(cls, cfg: Config) -> str:
        """The prefix of a run directory's default name."""
        return cfg.method.name

    # ---- helpers -------------------------------------------------------------------------
    def epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def at_step(self, schedule: np.ndarray, step: int) -> float:
        """The value of a per-step schedule at ``step`` (its last value past the end)."""
        return float(schedule[min(step, len(schedule) - 1)])

    # ---- the step ------------------------------------------------------------------------
    def forward(self, batch: Batch | Sequence[torch.Tensor], step: int) -> StepOutput:
        return self.training_step(Batch.of(batch), step)

    def training_step(self, batch: Batch, step: int) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        return parameter_groups(self.named_parameters())

    def on_after_backward(self, step: int) -> None:
        return None

    def on_after_optimizer_step(self, step: int) -> None:
        return None

    def on_skipped_step(self, step: int) -> None:
        """Called instead of the backward pass and the optimiser step when the step's loss was
        not finite: drop whatever the step prepared to write."""
        return None

    # ---- evaluation ----------------------------------------------------------------------
    def eval_backbone(self) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def eval_encoder(self) -> nn.Module | None:
        """The backbone + head evaluation uses for embeddings and assignments (None: no head)."""
        return None

    # ---- what the monitor and the reports read ---------------------------------------------
    @property
    def num_prototypes(self) -> int | None:
        return None

    @property
    def embedding_dim(self) -> int | None:
        return None

    def prototype_vectors(self) -> torch.Tensor | None:
        return None

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Prototype scores ``[N, K]`` of evaluation-time embeddings (None without prototypes)."""
        return None

    def probs_from_scores(self, scores: torch.Tensor) -> torch.Tensor | None:
        """The method's assignment distribution ``[N, K]`` given its prototype scores ``[N, K]``."""
        return None

    def assignment_probs(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """The method's assignment distribution ``[N, K]`` of evaluation-time embeddings."""
        scores = self.scores(embeddings)
        return None if scores is None else self.probs_from_scores(scores)

    def mixture_weights(self) -> torch.Tensor | None:
        """The weights ``pi`` ``[K]`` of a mixture-model prototype set (None otherwise)."""
        return None

    def idle_prototypes(self) -> torch.Tensor | None:
        """Boolean ``[K]``: prototypes that recently received (almost) no assignment mass, by the
        method's own usage record (None when the method keeps none)."""
        return None

    def uniform_loss(self) -> float | None:
        """The loss value of a fully collapsed, uniform-assignment model (for the alarm)."""
        return None

    def summary_fields(self) -> dict[str, Any]:
        """Facts about the method that ``summary.json`` records next to its name."""
        return {}

    def describe(self) -> str:
        """A short label for plots and tables."""
        return self.name

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
