"""Barlow Twins (Zbontar et al. 2021): two views of each image through one network, their
batch-standardised cross-correlation pushed to the identity (``losses/barlow_twins.py``).

network = backbone -> projector (``barlow_twins.layers`` linear layers, ``hidden_dim`` wide, with
BatchNorm + ReLU between them, ``output_dim`` out) -> ``z``. As in the official code, the linear
layers have no bias: a bias before a BatchNorm is cancelled by it, and the last one by the loss's
standardisation (with ``batchnorm=false`` the hidden layers keep theirs). There is no teacher and
no stop-gradient; evaluation uses the backbone.

Each view goes through the network on its own, as in the official code, so the BatchNorm layers
of the backbone and projector normalise each view with its own batch statistics.

What the monitor sees: ``embeddings`` are the first view's raw projections ``z_a`` (the monitor's
std and mean-direction measures normalise the rows themselves); ``features`` its backbone
features; ``logs`` the two terms before their weights (``loss_invariance``,
``loss_redundancy``). The std of the standardised ``z`` is 1 by construction, so the collapse
that ``lambda_offdiag = 0`` allows (dimensional: the dimensions become correlated) shows in the
effective rank of the embeddings and in ``loss_redundancy``, not in their std.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..losses.barlow_twins import barlow_twins_terms
from ..models.heads import ProjectionMLP
from ..utils.registry import METHODS
from .base import Encoder, SSLMethod, StepOutput, encode_views_separately


@dataclass
class BarlowTwinsSettings:
    hidden_dim: int = setting(2048, "hidden width of the projector (paper: 8192; solo-learn's CIFAR "
                                    "recipe: 2048)", 1)
    output_dim: int = setting(2048, "dimension d of the projection z whose d x d cross-correlation the "
                                    "loss compares (paper: 8192)", 1)
    layers: int = setting(3, "linear layers of the projector", 1)
    batchnorm: bool = setting(True, "BatchNorm after each hidden linear layer of the projector (the "
                                    "paper's projector has it)")
    lambda_offdiag: float = setting(
        0.0051, "weight lambda of the redundancy-reduction term sum_{i != j} C_ij^2 (official code: "
        "0.0051; paper: 5e-3). Failure switch: 0 keeps only the invariance term; the paper reports a "
        "large drop in linear accuracy, not a point collapse (the std of the standardised "
        "projections stays 1 while their effective rank falls: dimensional collapse)", 0.0)
    scale_loss: float = setting(
        1.0, "factor on the whole loss (solo-learn's scale_loss, 0.1 in its CIFAR recipe): the loss "
        "is a sum over d^2 terms, and biases and norm parameters are not rescaled by LARS", 0.0)

    def validate(self, cfg: Config) -> None:
        if cfg.views.local_crops:
            raise ConfigError(f"{cfg.method.name} trains on two views: set views.local_crops=0 "
                              f"(got {cfg.views.local_crops})")
        if self.scale_loss <= 0:
            raise ConfigError(f"barlow_twins.scale_loss must be > 0, got {self.scale_loss}")


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    name = "barlow_twins"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"barlow_twins": BarlowTwinsSettings}

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        """The ``d x d`` cross-correlation and the loss's temporaries with their
        gradients: about six ``d x d`` fp32 matrices, whatever the batch."""
        d = cfg.barlow_twins.output_dim
        return 6 * d * d * 4

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.barlow_twins
        self.lambda_offdiag = float(s.lambda_offdiag)
        self.scale_loss = float(s.scale_loss)
        self.output_dim = int(s.output_dim)
        projector = ProjectionMLP(self.feature_dim, s.hidden_dim, s.output_dim, s.layers, batchnorm=s.batchnorm,
                                  activation="relu", hidden_bias=not s.batchnorm, last_bias=False, init="torch")
        self.encoder = Encoder(backbone, projector, normalize=False)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        features, (z_a, z_b) = encode_views_separately(self.encoder, batch.crops[:2])
        invariance, redundancy = barlow_twins_terms(z_a, z_b)
        loss = self.scale_loss * (invariance + self.lambda_offdiag * redundancy)
        logs = {"loss_invariance": float(invariance.detach()), "loss_redundancy": float(redundancy.detach())}
        return StepOutput(loss=loss, logs=logs, embeddings=z_a.detach().float(),
                          features=features.detach().float())

    def eval_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.encoder

    def uniform_loss(self) -> float:
        """A constant output standardises to 0, so ``C = 0`` and the loss is ``scale_loss * d``."""
        return self.scale_loss * self.output_dim

    def summary_fields(self) -> dict:
        s = self.cfg.barlow_twins
        return {"lambda_offdiag": self.lambda_offdiag, "scale_loss": self.scale_loss,
                "projector_hidden_dim": s.hidden_dim, "projector_output_dim": s.output_dim,
                "projector_layers": s.layers, "projector_batchnorm": s.batchnorm}
