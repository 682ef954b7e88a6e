"""SimCLR (Chen et al. 2020): two views of each image through one network, NT-Xent over the
global batch (``losses/contrastive.py``).

network = backbone -> projection MLP (``contrastive.hidden_dim`` -> ``contrastive.output_dim``,
BatchNorm, ``contrastive.layers`` linear layers) -> ``z``; the loss L2-normalises ``z``. There is no
teacher; evaluation uses the backbone. The two views go through the network as one batch.

The ``contrastive`` settings and this class are the base of ``supcon`` and ``clop``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..losses.contrastive import nt_xent
from ..models.heads import ProjectionMLP
from ..utils.registry import METHODS
from .base import Encoder, SSLMethod, StepOutput


@dataclass
class ContrastiveSettings:
    temperature: float = setting(0.5, "temperature T of the contrastive softmax", 1e-4)
    hidden_dim: int = setting(2048, "hidden width of the projection MLP", 1)
    output_dim: int = setting(128, "dimension of the projection z the loss compares", 1)
    layers: int = setting(2, "linear layers of the projection MLP", 1)

    def validate(self, cfg: Config) -> None:
        if cfg.views.local_crops:
            raise ConfigError(f"{cfg.method.name} trains on two views: set views.local_crops=0 "
                              f"(got {cfg.views.local_crops})")


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    name = "simclr"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"contrastive": ContrastiveSettings}

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        c = cfg.contrastive
        self.temperature = c.temperature
        self.encoder = Encoder(backbone, ProjectionMLP(self.feature_dim, c.hidden_dim, c.output_dim, c.layers,
                                                       batchnorm=True), normalize=False)

    def contrastive_loss(self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)

    def extra_loss(self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch, logs: dict) -> torch.Tensor | None:
        """A term added to the contrastive loss (CLOP's prototype term)."""
        return None

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        features, z = self.encoder(batch.crops[:2])
        z1, z2 = z.float().chunk(2)
        loss = self.contrastive_loss(z1, z2, batch)
        logs = {"loss_contrastive": float(loss.detach())}
        extra = self.extra_loss(z1, z2, batch, logs)
        if extra is not None:
            loss = loss + extra
        n = batch.size
        return StepOutput(loss=loss, logs=logs, embeddings=nn.functional.normalize(z1.detach(), dim=-1),
                          features=features[:n].detach().float())

    def eval_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.encoder

    def summary_fields(self) -> dict:
        return {"temperature": self.temperature}
