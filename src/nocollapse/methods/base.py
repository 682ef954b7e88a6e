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
``resume_fixed_settings()`` (classmethod)  own keys ``--resume`` may not change (saved state reads
                                           differently under them)
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
``prototype_set()``                        the method's :class:`~nocollapse.prototypes.base.PrototypeSet`
                                           (None without prototypes); the hooks below read it
``num_prototypes`` / ``embedding_dim``     sizes the monitor needs (None without prototypes)
``prototype_vectors()``                    ``[K, D]`` prototypes (None without prototypes)
``probs_from_scores(scores)``              the method's ``[N, K]`` assignment distribution, from
                                           its scores (``assignment_probs(embeddings)`` composes both)
``mixture_weights()`` / ``idle_prototypes()``  mixture weights and the idle mask, if any
``saved_state_names()``                    historic checkpoint names of moved state entries
``uniform_loss()``                         the loss of a collapsed model (for the alarm)
``summary_fields()``                       method facts for ``summary.json``
``describe()``                             a short label for plots and tables
``trainable_parameter_count()``            parameters the optimiser trains
========================================  ====================================================

A method with prototypes owns one :class:`~nocollapse.prototypes.base.PrototypeSet` (learned,
decoupled or fixed) as a direct submodule; the defaults of the prototype hooks and of the step
hooks read it, so a method only overrides what is its own (DINO's teacher temperature in
``probs_from_scores``, say).

The engine wraps the whole method in DistributedDataParallel, so everything a step needs runs
inside ``forward`` (which accepts a ``Batch`` or a plain list of crops and calls
``training_step``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config
from ..data.batch import Batch
from ..models.heads import ProjectionMLP
from ..prototypes.base import PrototypeSet
from ..utils.optim import parameter_groups


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    teacher_probs: torch.Tensor | None = None   # [B, K] targets of the first global view
    # [B, K] predictions for the second global view, or a function of no arguments that returns them:
    # the monitor reads them at log steps only, so a method can leave the B x K softmax to those steps
    student_probs: torch.Tensor | Callable[[], torch.Tensor] | None = None
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


def encode_views_separately(encoder: Encoder, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each crop through ``encoder`` as if alone, as the reference code of Barlow Twins and VICReg
    runs its two views: the backbone sees each view as its own batch, and the projector's
    BatchNorms normalise each view with its own statistics, while its matrix products run once on
    the joined rows. Returns the first crop's backbone features and each crop's projection."""
    features = [encoder.backbone(c) for c in crops]
    projections = encoder.projector(torch.cat(features), groups=len(crops))
    if encoder.normalize:
        projections = F.normalize(projections, dim=-1)
    return features[0], list(projections.chunk(len(crops)))


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

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self.feature_dim = int(getattr(backbone, "feature_dim"))
        self._register_state_dict_hook(_save_under_historic_names)
        self._register_load_state_dict_pre_hook(_load_historic_names, with_module=True)

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
    def resume_fixed_settings(cls) -> tuple[str, ...]:
        """Keys (or section prefixes ending in ``.``) of :meth:`settings` that a resumed run may
        not change because its saved state means something else under another value while its
        tensors keep their shapes (a change of shape is found without this list). ``method.*``
        is always fixed; other keys of the method's sections (temperatures, loss weights) may
        change on resume."""
        return ()

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
        prototypes = self.prototype_set()
        if prototypes is not None:
            prototypes.after_backward(step)

    def on_after_optimizer_step(self, step: int) -> None:
        prototypes = self.prototype_set()
        if prototypes is not None:
            prototypes.after_optimizer_step(step)

    def on_skipped_step(self, step: int) -> None:
        """Called instead of the backward pass and the optimiser step when the step's loss was
        not finite: drop whatever the step prepared to write."""
        prototypes = self.prototype_set()
        if prototypes is not None:
            prototypes.discard()

    # ---- evaluation ----------------------------------------------------------------------
    def eval_backbone(self) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def eval_encoder(self) -> nn.Module | None:
        """The backbone + head evaluation uses for embeddings and assignments (None: no head)."""
        return None

    # ---- what the monitor and the reports read ---------------------------------------------
    def prototype_set(self) -> PrototypeSet | None:
        """The method's prototypes: its (first) direct submodule that is a
        :class:`~nocollapse.prototypes.base.PrototypeSet`, None without prototypes."""
        for child in self.children():
            if isinstance(child, PrototypeSet):
                return child
        return None

    @property
    def fixed_prototypes(self) -> bool:
        """Prototypes fixed and distinct by construction (a random codebook, orthonormal class
        prototypes): their uniqueness is not measured, their usage is."""
        prototypes = self.prototype_set()
        return prototypes is not None and prototypes.fixed

    @property
    def num_prototypes(self) -> int | None:
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.num_prototypes

    @property
    def embedding_dim(self) -> int | None:
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.dim

    def prototype_vectors(self) -> torch.Tensor | None:
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.vectors().detach()

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Prototype scores ``[N, K]`` of evaluation-time embeddings (None without prototypes):
        against the prototypes the targets come from."""
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.target_scores(embeddings)

    def probs_from_scores(self, scores: torch.Tensor) -> torch.Tensor | None:
        """The method's assignment distribution ``[N, K]`` given its prototype scores ``[N, K]``
        (by default a softmax without temperature)."""
        return torch.softmax(scores.float(), dim=-1)

    def assignment_probs(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """The method's assignment distribution ``[N, K]`` of evaluation-time embeddings."""
        scores = self.scores(embeddings)
        return None if scores is None else self.probs_from_scores(scores)

    def mixture_weights(self) -> torch.Tensor | None:
        """The weights ``pi`` ``[K]`` of a mixture-model prototype set (None otherwise)."""
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.usage_weights()

    def idle_prototypes(self) -> torch.Tensor | None:
        """Boolean ``[K]``: prototypes that recently received (almost) no assignment mass, by the
        method's own usage record (None when the method keeps none)."""
        prototypes = self.prototype_set()
        return None if prototypes is None else prototypes.idle_mask()

    def saved_state_names(self) -> dict[str, tuple[str, bool]]:
        """State entries that checkpoints keep under an earlier name: ``{current key or prefix
        (ending in "."): (saved key or prefix, transposed)}``. ``state_dict()`` writes them under
        the saved name and ``load_state_dict()`` reads them back, so runs written before the
        entry moved still load and new checkpoints keep the format they always had."""
        return {}

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


def _renamed(key: str, names: dict[str, tuple[str, bool]], reverse: bool) -> tuple[str, bool] | None:
    for current, (saved, transposed) in names.items():
        source, target = (saved, current) if reverse else (current, saved)
        if current.endswith("."):
            if key.startswith(source):
                return target + key[len(source):], transposed
        elif key == source:
            return target, transposed
    return None


def _save_under_historic_names(module: SSLMethod, state_dict: dict, prefix: str, local_metadata) -> None:
    names = module.saved_state_names()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = _renamed(key[len(prefix):], names, reverse=False)
        if renamed is not None:
            value = state_dict.pop(key)
            state_dict[prefix + renamed[0]] = value.t() if renamed[1] else value


def _load_historic_names(module: SSLMethod, state_dict: dict, prefix: str, *args) -> None:
    names = module.saved_state_names()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = _renamed(key[len(prefix):], names, reverse=True)
        if renamed is not None:
            value = state_dict.pop(key)
            state_dict[prefix + renamed[0]] = value.t().contiguous() if renamed[1] else value
