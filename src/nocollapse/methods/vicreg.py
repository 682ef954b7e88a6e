"""VICReg (Bardes, Ponce & LeCun 2022): two views of each image through one network; an invariance
term pulls the two projections together, a variance hinge keeps every dimension's std over the
batch above 1 and a covariance term decorrelates the dimensions (``losses/vicreg.py``).

network = backbone -> expander (``vicreg.layers`` linear layers, ``hidden_dim`` wide, with
BatchNorm + ReLU between them, ``output_dim`` out) -> ``z``, not normalised. The official code
puts a bias on the hidden layers, which the following BatchNorm cancels, and none on the last
one, whose bias the loss cannot see (``s`` compares differences, ``v`` and ``c`` are centred):
here neither has one while BatchNorm follows (with ``batchnorm=false`` the hidden layers keep
theirs). There is no teacher and no stop-gradient; evaluation uses the backbone.

Each view goes through the network on its own, as in the official code, so the BatchNorm layers
normalise each view with its own batch statistics.

What the monitor sees: ``embeddings`` are the first view's raw projections ``z_a`` (the monitor's
std and mean-direction measures normalise the rows themselves); ``features`` its backbone
features; ``logs`` the three terms before their weights (``loss_invariance``, ``loss_variance``,
``loss_covariance``). Without the variance term (``variance_weight = 0``) the projections fall
together: their per-dimension std and the std of their L2-normalised rows go to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..losses.vicreg import EPS, collapsed_vicreg_loss, vicreg_terms
from ..models.heads import ProjectionMLP
from ..utils.registry import METHODS
from .base import Encoder, SSLMethod, StepOutput, encode_views_separately


@dataclass
class VICRegSettings:
    hidden_dim: int = setting(2048, "hidden width of the expander (paper: 8192; solo-learn's CIFAR "
                                    "recipe: 2048)", 1)
    output_dim: int = setting(2048, "dimension of the projection z the loss compares (paper: 8192)", 1)
    layers: int = setting(3, "linear layers of the expander", 1)
    batchnorm: bool = setting(True, "BatchNorm after each hidden linear layer of the expander (the "
                                    "paper's expander has it)")
    invariance_weight: float = setting(25.0, "weight lambda of the invariance term (the mean squared "
                                             "difference of the two views' projections)", 0.0)
    variance_weight: float = setting(
        25.0, "weight mu of the variance hinge mean_j relu(1 - sqrt(Var z_j + 1e-4)), averaged over the "
        "two branches. Failure switch: 0 removes the only term that keeps the projections apart; the "
        "paper reports a collapse to a single vector (the per-dimension std of z goes to 0)", 0.0)
    covariance_weight: float = setting(1.0, "weight nu of the covariance term (squared off-diagonal "
                                            "covariances / d, summed over the two branches)", 0.0)

    def validate(self, cfg: Config) -> None:
        if cfg.views.local_crops:
            raise ConfigError(f"{cfg.method.name} trains on two views: set views.local_crops=0 "
                              f"(got {cfg.views.local_crops})")
        if not (self.invariance_weight or self.variance_weight or self.covariance_weight):
            raise ConfigError("vicreg: invariance_weight, variance_weight and covariance_weight are all 0, "
                              "which leaves no loss")


@METHODS.register("vicreg")
class VICReg(SSLMethod):
    name = "vicreg"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"vicreg": VICRegSettings}

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        """Per branch, the ``d x d`` covariance and the loss's temporaries with
        their gradients: about eight ``d x d`` fp32 matrices, whatever the batch."""
        d = cfg.vicreg.output_dim
        return 8 * d * d * 4

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.vicreg
        self.weights = (float(s.invariance_weight), float(s.variance_weight), float(s.covariance_weight))
        projector = ProjectionMLP(self.feature_dim, s.hidden_dim, s.output_dim, s.layers, batchnorm=s.batchnorm,
                                  activation="relu", hidden_bias=not s.batchnorm, last_bias=False, init="torch")
        self.encoder = Encoder(backbone, projector, normalize=False)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        features, (z_a, z_b) = encode_views_separately(self.encoder, batch.crops[:2])
        invariance, variance, covariance = vicreg_terms(z_a, z_b)
        w_inv, w_var, w_cov = self.weights
        loss = w_inv * invariance + w_var * variance + w_cov * covariance
        logs = {"loss_invariance": float(invariance.detach()), "loss_variance": float(variance.detach()),
                "loss_covariance": float(covariance.detach())}
        return StepOutput(loss=loss, logs=logs, embeddings=z_a.detach().float(),
                          features=features.detach().float())

    def eval_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.encoder

    def uniform_loss(self) -> float:
        """A constant output (both views the same vector) costs only the variance hinge,
        ``variance_weight * (1 - sqrt(1e-4))``."""
        return collapsed_vicreg_loss(self.weights[1], eps=EPS)

    def summary_fields(self) -> dict:
        s = self.cfg.vicreg
        return {"invariance_weight": s.invariance_weight, "variance_weight": s.variance_weight,
                "covariance_weight": s.covariance_weight, "projector_hidden_dim": s.hidden_dim,
                "projector_output_dim": s.output_dim, "projector_layers": s.layers,
                "projector_batchnorm": s.batchnorm}
