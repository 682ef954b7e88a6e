"""BYOL (Grill et al. 2020): an online network predicts, from one view, the projection an
exponential moving average of itself (the target) gives the other view; no negatives.

online  = backbone -> projector (Linear -> BN -> ReLU -> Linear, no output bias) -> z
          -> predictor (the same layout) -> p
target  = an EMA copy of backbone + projector, no predictor, no gradient -> z'

The loss (``losses/negative_cosine.py``) is the symmetrised normalised MSE of the DeepMind code,
``(2 - 2 cos(p1, z'2)) + (2 - 2 cos(p2, z'1))``, in [0, 8]. After every optimiser step the target
moves towards the online network, ``xi <- tau xi + (1 - tau) theta`` over the parameters, with
``tau`` rising from ``byol.momentum`` to ``byol.momentum_end`` by a half cosine over the run's
steps (the paper's ``tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2``). The target starts as an
exact copy of the online network (the DeepMind code initialises it independently; the paper
reports no difference), runs its BatchNorm in training mode (batch statistics) like the online
network, and keeps its own running statistics (the EMA covers parameters only).

Each view goes through the networks as a batch of its own, so BatchNorm normalises each view
with its own statistics, as the reference code does. Evaluation uses the online backbone: it is
what the paper keeps at the end of training.

Collapse: the predictor and the slow target together keep the constant representation
unstable. ``byol.predictor=false`` removes the predictor (the paper's Table 5: accuracy falls to
0.2 %, the "unsupervised mean teacher"), and ``byol.momentum=0 byol.momentum_end=0`` makes the
target a copy of the online network at every step (0.3 %). The monitor reads the online
projection of the first view, L2-normalised: its per-dimension std falls towards 0 on collapse
(healthy: about ``1/sqrt(D)``); ``z_std`` logs the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..diagnostics.embeddings import embedding_std
from ..losses.negative_cosine import byol_loss
from ..models.heads import ProjectionMLP
from ..utils.registry import METHODS
from ..utils.schedules import cosine_schedule
from .base import Encoder, SSLMethod, StepOutput, ema_update, frozen_copy


@dataclass
class BYOLSettings:
    hidden_dim: int = setting(4096, "hidden width of the projector", 1)
    output_dim: int = setting(256, "dimension of the projection z and of the prediction p", 1)
    predictor: bool = setting(
        True, "the online predictor q(z). false is the failure switch of the paper's Table 5 (no "
        "predictor: the representation collapses); byol.predictor_hidden_dim is then unused")
    predictor_hidden_dim: int = setting(4096, "hidden width of the predictor", 1)
    batchnorm: bool = setting(
        True, "BatchNorm in the hidden layer of the projector and of the predictor (per process "
        "unless model.sync_batchnorm)")
    momentum: float = setting(
        0.996, "EMA momentum tau of the target at the start, rising to byol.momentum_end by a half "
        "cosine over the run's steps (0 with byol.momentum_end=0: the target is a copy of the "
        "online network, a failure switch of the paper's Table 5)", 0.0, 1.0)
    momentum_end: float = setting(1.0, "EMA momentum of the target at the end", 0.0, 1.0)

    def validate(self, cfg: Config) -> None:
        if cfg.views.local_crops:
            raise ConfigError(f"byol trains on two views: set views.local_crops=0 (got {cfg.views.local_crops})")
        if self.momentum_end < self.momentum:
            raise ConfigError(f"byol.momentum_end ({self.momentum_end}) must be >= byol.momentum ({self.momentum})")


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int, batchnorm: bool) -> ProjectionMLP:
    """BYOL's projector and predictor layout: Linear -> BN -> ReLU -> Linear without bias (as the
    DeepMind code; the output is L2-normalised by the loss, no BatchNorm on it)."""
    return ProjectionMLP(in_dim, hidden_dim, out_dim, layers=2, batchnorm=batchnorm, activation="relu",
                         hidden_bias=True, last_bias=False, init="torch")


@METHODS.register("byol")
class BYOL(SSLMethod):
    name = "byol"
    eval_network_name = "online backbone"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"byol": BYOLSettings}

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        b = cfg.byol
        self.online = Encoder(backbone, byol_mlp(self.feature_dim, b.hidden_dim, b.output_dim, b.batchnorm),
                              normalize=False)
        self.predictor = (byol_mlp(b.output_dim, b.predictor_hidden_dim, b.output_dim, b.batchnorm)
                          if b.predictor else nn.Identity())
        self.target = frozen_copy(self.online)
        self.momentum = cosine_schedule(b.momentum, b.momentum_end, self.total_steps)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        views = batch.crops[:2]
        online = [self.online([v]) for v in views]          # one batch per view (BatchNorm)
        p1, p2 = (self.predictor(z) for _, z in online)
        with torch.no_grad():
            t1, t2 = (self.target([v])[1] for v in views)
        loss = byol_loss(p1, p2, t1, t2)
        features, z1 = online[0]
        z1 = z1.detach().float()
        logs = {"loss_byol": float(loss.detach()), "z_std": embedding_std(z1),
                "target_momentum": self.at_step(self.momentum, step)}
        return StepOutput(loss=loss, logs=logs, embeddings=F.normalize(z1, dim=-1),
                          features=features.detach().float())

    def on_after_optimizer_step(self, step: int) -> None:
        super().on_after_optimizer_step(step)
        ema_update(self.target, self.online, self.at_step(self.momentum, step))

    def eval_backbone(self) -> nn.Module:
        return self.online.backbone

    def eval_encoder(self) -> nn.Module:
        return self.online

    def uniform_loss(self) -> None:
        """None: the alarm compares the loss with a collapse value, but BYOL's loss is 0 both for a
        collapsed model and for a perfect predictor of the target, so its value cannot tell them
        apart (and a reference of 0 gives the relative tolerance no width). The representation
        alarm on the embeddings' std is the monitor that does."""
        return None

    def summary_fields(self) -> dict:
        b = self.cfg.byol
        return {"predictor": b.predictor, "target_momentum": b.momentum, "target_momentum_end": b.momentum_end}

    def describe(self) -> str:
        return self.name if self.cfg.byol.predictor else f"{self.name} (no predictor)"
