"""Shared machinery of prototype methods (DINO, CARP with an EMA teacher; SwAV without one):
the encoders, learned or decoupled prototypes behind one interface
(:class:`~nocollapse.prototypes.base.PrototypeSet`), the EMA update, prototype freezing and the
annealing schedule of the mixture, with the settings they read (``method.*`` and ``gmm.*``).

``method.prototypes``:

* ``learned``: the prototypes are a trainable last layer
  (:class:`~nocollapse.prototypes.learned.LearnedPrototypes`), EMA-copied to the teacher when
  the method has one.
* ``decoupled`` ("Why Prototypes Collapse"): one online-EM Gaussian mixture
  (:class:`~nocollapse.prototypes.decoupled.DecoupledPrototypes`), fitted on the (teacher's)
  bottleneck embeddings before every step, provides the prototypes for both networks; its means
  receive no gradient and are not in the optimiser.

The method only calls the set's interface: ``update`` (the mixture's EM proposal; nothing for
learned prototypes), scoring, and the hooks after backward and after the optimiser step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ConfigError, choice, setting
from ..diagnostics.assignments import mixture_stats
from ..losses.koleo import koleo_loss
from ..prototypes.base import PrototypeSet
from ..prototypes.decoupled import DecoupledPrototypes
from ..prototypes.learned import LearnedPrototypes
from ..prototypes.space import SPACES
from ..utils import distributed as dist_utils
from ..utils.schedules import cosine_schedule
from .base import SSLMethod, build_encoder, ema_update, frozen_copy


@dataclass
class HeadSettings:
    hidden_dim: int = setting(2048, "hidden width of the projection MLP", 1)
    bottleneck_dim: int = setting(256, "dimension of the bottleneck the prototypes live in", 1)
    layers: int = setting(3, "number of linear layers of the projection MLP", 1)
    batchnorm: bool = setting(False, "BatchNorm in the projection MLP")
    norm_last_layer: bool = setting(True, "fix the norm of learned prototypes to 1 (weight-norm g frozen)")


@dataclass
class PrototypeSettings:
    """``method.*`` keys of prototype methods with an EMA teacher."""

    prototypes: str = choice(
        "learned", ("learned", "decoupled"),
        "learned: prototypes are a trainable last layer; decoupled: an online-EM Gaussian mixture")
    num_prototypes: int = setting(4096, "K, the number of prototypes", 2)
    head: HeadSettings = field(default_factory=HeadSettings)
    teacher_momentum: float = setting(0.996, "EMA momentum of the teacher at the start (cosine to 1)", 0.0, 1.0)
    teacher_momentum_end: float = setting(1.0, "EMA momentum of the teacher at the end", 0.0, 1.0)
    freeze_last_layer_epochs: float = setting(1.0, "epochs during which learned prototypes get no update", 0.0)
    koleo_weight: float = setting(0.0, "weight of the KoLeo regulariser on learned prototypes (DINO + KP)", 0.0)
    embedding_koleo_weight: float = setting(
        0.0, "weight of the KoLeo regulariser on the student's L2-normalised bottleneck embeddings, per "
        "global crop over the (gathered) batch, as DINOv2 spreads its features; it keeps the encoder from "
        "packing the images into a few tight clumps around a few prototypes", 0.0)

    def validate(self, cfg: Config) -> None:
        if self.teacher_momentum_end < self.teacher_momentum:
            raise ConfigError("method.teacher_momentum_end must be >= method.teacher_momentum")


@dataclass
class GmmSettings:
    """``gmm.*``: the online-EM mixture of decoupled prototypes (``prototypes/gmm.py``)."""

    covariance: str = choice("diagonal", ("diagonal", "isotropic"), "component covariance")
    eta: float = setting(0.01, "forgetting factor of the running sufficient statistics", 0.0, 1.0)
    forgetting: str = choice("per_component", ("per_component", "global"),
                             "per_component: a component forgets in proportion to the responsibility it gets")
    beta0: float = setting(0.25, "initial inverse temperature of the annealed E-step", 1e-6, 1.0)
    anneal_epochs: float = setting(2.0, "epochs over which beta rises from beta0 to 1", 0.0)
    var_floor: float = setting(1e-4, "variance floor of the M-step", 1e-12)
    init: str = choice("data", ("random", "data"),
                       "random unit vectors, or seeded from the first teacher embeddings")
    reseed_dead: bool = setting(False, "re-seed idle components onto current embeddings (k-means++ on the batch)")
    dead_threshold: float = setting(0.01, "a component is idle when its recent usage (EMA, rate eta, of the "
                                    "responsibility it receives) falls below this fraction of a uniform share", 0.0)
    chunk_size: int = setting(4096, "components per chunk in the E-step (bounds memory)", 1)
    targets: str = choice("similarity", ("similarity", "posterior"),
                          "teacher targets: softmax of similarities to the means, or mixture responsibilities")
    estep_weights: str = choice(
        "statistics", ("statistics", "occupancy"),
        "log pi of the E-step: from the per-component-forgotten statistics S0, or from the globally "
        "forgotten occupancy that the reports read (it lets idle components lose their weight)")
    space: str = choice(
        "sphere", SPACES,
        "space the mixture is fitted and scored in: sphere (the unit-normalised embeddings, as the paper), "
        "or one that removes what all embeddings share (running mean: centered; and per-dimension scale: "
        "standardized; or covariance: whitened), for heads whose embeddings sit in a narrow cone")
    space_momentum: float = setting(0.99, "momentum of the running statistics of gmm.space", 0.0, 0.999999)
    space_shrinkage: float = setting(
        0.01, "gmm.space whitened/standardized: variance floor as a fraction of the mean variance", 1e-9)
    buffer_factor: float = setting(
        0.0, "keep the last buffer_factor x K gathered teacher embeddings for seeding and refreshing "
        "(0: no buffer; then only the first-batch seeds and gmm.reseed_dead)", 0.0)
    seed_after_epochs: float = setting(
        1.0, "with a buffer: after this many epochs, re-seed every component on the buffer (the step "
        "runs on the first-batch seeds until then)", 0.0)
    seeding: str = choice("auto", ("auto", "kmeans++", "random_subset"),
                          "placement of the buffer seeding: greedy k-means++, a random subset of the "
                          "buffer, or auto (k-means++ up to K = 8192)")
    lloyd_iterations: int = setting(3, "Lloyd passes on the buffer after the buffer seeding", 0)
    refresh_every_epochs: float = setting(
        0.0, "with a buffer: every this many epochs after the seeding, re-place the idle components "
        "by k-means++ on the buffer (0: never)", 0.0)

    def validate(self, cfg: Config) -> None:
        if self.buffer_factor and self.buffer_factor < 1:
            raise ConfigError(f"gmm.buffer_factor ({self.buffer_factor}) must be 0 or at least 1 (the buffer "
                              f"must hold at least K embeddings to seed K components)")
        if self.refresh_every_epochs and not self.buffer_factor:
            raise ConfigError("gmm.refresh_every_epochs needs a buffer: set gmm.buffer_factor (e.g. 4)")


def build_decoupled_prototypes(cfg: Config, dim: int, steps: Callable[[float], int]) -> DecoupledPrototypes:
    """The mixture of ``gmm.*``, with its epoch-based schedules converted to steps by ``steps``
    (the method's :meth:`~nocollapse.methods.base.SSLMethod.epochs_to_steps`)."""
    g = cfg.gmm
    buffered = g.buffer_factor > 0
    return DecoupledPrototypes(
        cfg.method.num_prototypes, dim, beta0=g.beta0, anneal_steps=steps(g.anneal_epochs),
        seed_after_steps=steps(g.seed_after_epochs) if buffered else 0,
        refresh_every_steps=steps(g.refresh_every_epochs) if buffered else 0,
        covariance=g.covariance, eta=g.eta, forgetting=g.forgetting, var_floor=g.var_floor, init=g.init,
        reseed_dead=g.reseed_dead, dead_threshold=g.dead_threshold, chunk_size=g.chunk_size,
        seed=cfg.train.seed, estep_weights=g.estep_weights,
        buffer_size=int(round(g.buffer_factor * cfg.method.num_prototypes)),
        seeding=g.seeding, lloyd_iterations=g.lloyd_iterations,
        space=g.space, space_momentum=g.space_momentum, space_shrinkage=g.space_shrinkage)


def build_prototypes(cfg: Config, dim: int, steps: Callable[[float], int], *, ema_teacher: bool,
                     normalization: str = "weight_norm", init: str = "trunc_normal") -> PrototypeSet:
    """The prototypes ``method.prototypes`` names: the mixture of ``gmm.*``, or a learned layer
    (with an EMA teacher copy when ``ema_teacher``) frozen for ``method.freeze_last_layer_epochs``."""
    m = cfg.method
    if m.prototypes == "decoupled":
        return build_decoupled_prototypes(cfg, dim, steps)
    return LearnedPrototypes(dim, m.num_prototypes, norm_fixed=m.head.norm_last_layer, normalization=normalization,
                             init=init, ema_teacher=ema_teacher, freeze_steps=steps(m.freeze_last_layer_epochs))


class PrototypeMethod(SSLMethod):
    """Encoders and K prototypes, learned or decoupled; a student/teacher pair when
    ``has_teacher`` (the teacher an EMA of the student), one network otherwise."""

    normalize_embeddings = True
    eval_network_name = "teacher backbone"
    #: an EMA teacher encoder (DINO, CARP); SwAV scores its own network's detached outputs
    has_teacher = True

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {**super().settings(), "method": PrototypeSettings, "gmm": GmmSettings}

    @classmethod
    def inactive_settings(cls, cfg: Config) -> dict[str, str]:
        if cfg.method.prototypes == "decoupled":
            learned_only = "method.prototypes is 'learned'"
            return {"method.freeze_last_layer_epochs": learned_only, "method.koleo_weight": learned_only,
                    "method.head.norm_last_layer": learned_only}
        return {"gmm": "method.prototypes is 'decoupled'"}

    @classmethod
    def resume_fixed_settings(cls) -> tuple[str, ...]:
        """The mixture's saved variances are per dimension or one per component by
        ``gmm.covariance``, in tensors of the same shape."""
        return (*super().resume_fixed_settings(), "gmm.covariance")

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        """Prototypes (+ EMA copy or mixture statistics) and the ``[rows, K]`` scores with their
        gradients, in fp32; with decoupled prototypes also the mixture's E-step, a log-joint and
        responsibilities over the two global views' rows (``[2B, K]`` each)."""
        k, d = cfg.method.num_prototypes, cfg.method.head.bottleneck_dim
        decoupled = cfg.method.prototypes == "decoupled"
        state = (4 if decoupled else 6) * k * d * 4
        e_step = 2 * (2 * cfg.train.batch_size) * k * 4 if decoupled else 0
        return state + 4 * rows * k * 4 + e_step

    @classmethod
    def run_name(cls, cfg: Config) -> str:
        return f"{cfg.method.name}-{cfg.method.prototypes}"

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        m = cfg.method
        self.student = self.build_student(backbone)
        if self.has_teacher:
            self.teacher = frozen_copy(self.student)
        prototypes = self.build_prototype_set(m.head.bottleneck_dim)
        # the mixture keeps the name its state has always been saved under
        setattr(self, "gmm" if prototypes.kind == "decoupled" else "prototypes", prototypes)
        self.momentum = cosine_schedule(m.teacher_momentum, m.teacher_momentum_end, self.total_steps)
        self.koleo_weight = m.koleo_weight if prototypes.kind == "learned" else 0.0

    def build_student(self, backbone: nn.Module) -> nn.Module:
        """The trained encoder: backbone + the projection MLP of ``method.head``."""
        return build_encoder(backbone, self.cfg.method.head, normalize=self.normalize_embeddings)

    def build_prototype_set(self, dim: int) -> PrototypeSet:
        return build_prototypes(self.cfg, dim, self.epochs_to_steps, ema_teacher=self.has_teacher)

    def saved_state_names(self) -> dict[str, tuple[str, bool]]:
        # learned prototypes were two attributes of the method before they became one set
        return {"prototypes.student.": ("student_prototypes.", False),
                "prototypes.teacher.": ("teacher_prototypes.", False)}

    # ---- prototypes ----------------------------------------------------------------------
    @property
    def target_encoder(self) -> nn.Module:
        """The network targets come from: the teacher, or the student itself without one."""
        return self.teacher if self.has_teacher else self.student

    @property
    def student_prototypes(self):
        """The trained prototype layer of learned prototypes."""
        return self.prototype_set().student

    @property
    def teacher_prototypes(self):
        """The EMA copy of learned prototypes."""
        return self.prototype_set().teacher

    def student_scores(self, z: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, K]`` scores of the trained path; with ``order`` (``[K]`` prototype indices) their
        columns come in that order (``PrototypeSet.ordered_scores``)."""
        prototypes = self.prototype_set()
        return prototypes(z) if order is None else prototypes.ordered_scores(z, order)

    def teacher_scores(self, z: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, K]`` scores against the prototypes targets come from, columns in ``order`` if given."""
        prototypes = self.prototype_set()
        return prototypes.target_scores(z) if order is None else prototypes.ordered_target_scores(z, order)

    def update_mixture(self, teacher_embeddings: torch.Tensor, step: int, views: int = 2) -> torch.Tensor | None:
        """(i) of the decoupled scheme: the EM step on the detached teacher embeddings (``views``
        blocks of one batch, view-major), proposed by the set and committed by
        :meth:`on_after_optimizer_step`, that is, only once the step's loss was finite; until then
        student and teacher score against the means its targets came from. None for learned
        prototypes (nothing to propose)."""
        return self.prototype_set().update(teacher_embeddings, step, views=views)

    def mixture_logs(self) -> dict[str, float]:
        prototypes = self.prototype_set()
        weights = prototypes.usage_weights()
        if weights is None:
            return prototypes.step_logs()
        mix = mixture_stats(weights.detach().cpu(), idle=prototypes.idle_mask().cpu())
        return {"gmm_weight_perplexity": mix["perplexity"], "gmm_dead": float(mix["dead"]), **prototypes.step_logs()}

    def koleo_term(self, loss: torch.Tensor, logs: dict[str, float],
                   student_embeddings: torch.Tensor | None = None, batch: int = 0) -> torch.Tensor:
        """``loss + koleo_weight * KoLeo(learned prototypes)`` (DINO + KP) ``+ embedding_koleo_weight
        * mean_c KoLeo(global crop c's embeddings)``, each logged. ``student_embeddings`` are the
        view-major student bottleneck rows (``batch`` per crop); the first two crops are the global
        ones, and each is gathered over processes (with gradients) so that the nearest neighbours
        are those of the global batch."""
        if self.koleo_weight > 0:
            kp = koleo_loss(self.prototype_set().trainable_vectors())
            logs["loss_koleo"] = float(kp.detach())
            loss = loss + self.koleo_weight * kp
        weight = self.cfg.method.embedding_koleo_weight
        if weight > 0 and student_embeddings is not None:
            crops = student_embeddings[:2 * batch].float().split(batch)
            ke = sum(koleo_loss(dist_utils.all_gather_cat(c)) for c in crops) / len(crops)
            logs["loss_embedding_koleo"] = float(ke.detach())
            loss = loss + weight * ke
        return loss

    def uniform_loss(self) -> float:
        """The loss of a fully collapsed (uniform-assignment) model: log K."""
        return math.log(self.cfg.method.num_prototypes)

    def summary_fields(self) -> dict[str, Any]:
        return {"prototypes": self.cfg.method.prototypes, "num_prototypes": self.num_prototypes}

    def describe(self) -> str:
        return f"{self.name} ({self.cfg.method.prototypes})"

    # ---- hooks ---------------------------------------------------------------------------
    def on_after_optimizer_step(self, step: int) -> None:
        m = self.at_step(self.momentum, step)
        self.prototype_set().after_optimizer_step(step, teacher_momentum=m if self.has_teacher else None)
        if self.has_teacher:
            ema_update(self.teacher, self.student, m)

    def eval_backbone(self) -> nn.Module:
        return self.target_encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.target_encoder
