"""SimSiam (Chen & He 2021): one network, two views; the prediction of each view regresses onto
the other view's projection, which takes no gradient (stop-gradient). No negatives, no EMA.

network   = backbone -> projector (``simsiam.layers`` Linear layers, BN + ReLU between them, and a
            BatchNorm without affine parameters on the output) -> z
predictor = Linear -> BN -> ReLU -> Linear, a bottleneck (``simsiam.predictor_hidden_dim``,
            d/4 in the paper), no BatchNorm on its output -> p

The loss (``losses/negative_cosine.py``) is ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D``
the negative cosine, in [-1, 1]. The layers followed by a BatchNorm have no bias (the reference
code keeps a frozen bias before the projector's output BatchNorm, which that BatchNorm cancels);
with ``simsiam.batchnorm=false`` every BatchNorm is removed and those layers get their bias back.
Each view goes through the network as a batch of its own, as in the reference code.

``simsiam.fixed_predictor_lr`` (the paper's ``--fix-pred-lr``) keeps the predictor's learning
rate at the peak of the schedule: its parameter groups carry ``fixed_lr``, which the optimiser
set-up honours (``utils/optim.py``). The paper decays every parameter, BatchNorm included; the
recipes set ``optim.decay_norms_and_biases`` for that.

Collapse: the stop-gradient is what prevents it. ``simsiam.stop_gradient=false`` lets the
gradient flow through both branches (the paper's Fig. 2: the loss falls to -1 at once, the
per-dimension std of the L2-normalised output falls to 0 and the accuracy to 0.1 %). The monitor
reads the projection of the first view, L2-normalised (healthy std about ``1/sqrt(D)``);
``z_std`` logs the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn import functional as F

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..diagnostics.embeddings import embedding_std
from ..losses.negative_cosine import simsiam_loss
from ..models.heads import ProjectionMLP
from ..utils.optim import parameter_groups
from ..utils.registry import METHODS
from .base import Encoder, SSLMethod, StepOutput


@dataclass
class SimSiamSettings:
    hidden_dim: int = setting(2048, "hidden width of the projector", 1)
    output_dim: int = setting(2048, "dimension of the projection z and of the prediction p", 1)
    layers: int = setting(3, "Linear layers of the projector (3 in the paper's ImageNet model, 2 for CIFAR)", 1)
    predictor_hidden_dim: int = setting(512, "hidden width of the predictor (a bottleneck, output_dim / 4)", 1)
    batchnorm: bool = setting(
        True, "BatchNorm in the projector (hidden layers and output) and in the predictor's hidden "
        "layer (per process unless model.sync_batchnorm)")
    fixed_predictor_lr: bool = setting(
        True, "keep the predictor's learning rate constant at the schedule's peak (the paper's "
        "--fix-pred-lr) instead of following the cosine schedule")
    stop_gradient: bool = setting(
        True, "stop the gradient through the target projection z. false is the failure switch of "
        "the paper's Fig. 2 (the representation collapses)")

    def validate(self, cfg: Config) -> None:
        if cfg.views.local_crops:
            raise ConfigError(f"simsiam trains on two views: set views.local_crops=0 (got {cfg.views.local_crops})")


def simsiam_heads(in_dim: int, s: SimSiamSettings) -> tuple[ProjectionMLP, ProjectionMLP]:
    """The projector and the predictor of ``simsiam.*`` (see the module doc)."""
    bn = s.batchnorm
    projector = ProjectionMLP(in_dim, s.hidden_dim, s.output_dim, s.layers, batchnorm=bn, activation="relu",
                              hidden_bias=not bn, last_bias=not bn, output_batchnorm=bn, init="torch")
    predictor = ProjectionMLP(s.output_dim, s.predictor_hidden_dim, s.output_dim, 2, batchnorm=bn,
                              activation="relu", hidden_bias=not bn, last_bias=True, init="torch")
    return projector, predictor


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    name = "simsiam"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"simsiam": SimSiamSettings}

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.simsiam
        projector, self.predictor = simsiam_heads(self.feature_dim, s)
        self.encoder = Encoder(backbone, projector, normalize=False)
        self.stop_gradient = s.stop_gradient

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        encoded = [self.encoder([v]) for v in batch.crops[:2]]   # one batch per view (BatchNorm)
        (features, z1), (_, z2) = encoded
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2, stop_gradient=self.stop_gradient)
        z1 = z1.detach().float()
        logs = {"loss_simsiam": float(loss.detach()), "z_std": embedding_std(z1)}
        return StepOutput(loss=loss, logs=logs, embeddings=F.normalize(z1, dim=-1),
                          features=features.detach().float())

    def parameter_groups(self) -> list[dict]:
        """The encoder's groups, then the predictor's, flagged ``fixed_lr`` with
        ``simsiam.fixed_predictor_lr`` (biases and norms exempt from decay in each, unless
        ``optim.decay_norms_and_biases``)."""
        groups = parameter_groups(self.encoder.named_parameters())
        predictor = parameter_groups(self.predictor.named_parameters())
        if self.cfg.simsiam.fixed_predictor_lr:
            predictor = [{**g, "fixed_lr": True} for g in predictor]
        return groups + predictor

    def eval_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.encoder

    def uniform_loss(self) -> None:
        """None: the loss of a collapsed model is -1, but so is the loss of a perfectly invariant
        one, and a healthy run approaches it, so a loss near -1 would raise false alarms. The
        representation alarm on the embeddings' std is the monitor that tells them apart."""
        return None

    def summary_fields(self) -> dict:
        s = self.cfg.simsiam
        return {"stop_gradient": s.stop_gradient, "fixed_predictor_lr": s.fixed_predictor_lr}

    def describe(self) -> str:
        return self.name if self.stop_gradient else f"{self.name} (no stop-gradient)"
