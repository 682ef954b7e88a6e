"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes over multi-crop.

network = backbone -> projection MLP (``method.head``: Linear -> BatchNorm -> ReLU -> Linear, as
the reference code) -> L2-normalised ``z`` -> scores ``z C^T`` against K prototypes. One network,
no teacher: the codes of the two full-resolution crops come from the network's own detached
scores, balanced over the global batch by Sinkhorn-Knopp, and every crop predicts the codes of
the other assignment crops (``losses/swav.py``).

As the reference code:

* learned prototypes (``method.prototypes=learned``) are a bias-free linear layer whose rows are
  rescaled to unit norm at the start and after every optimiser step, and whose gradient is
  dropped during the first ``method.freeze_last_layer_epochs``;
* a queue of past embeddings of the assignment crops (``swav.queue_length`` rows over all
  processes, each process keeping its own share) is filled from ``swav.queue_start_epochs`` on
  and joins the Sinkhorn problem once full, rescored against the current prototypes; it is
  trimmed to a multiple of the global batch;
* only the Sinkhorn sums cross processes; the queue stays on its process.

``method.prototypes=decoupled`` replaces the learned layer with the online-EM mixture
("Why Prototypes Collapse"), fitted on the detached embeddings of the two assignment crops: the
codes and predictions are computed against its means, which take no gradient.

``swav.codes=softmax`` removes SwAV's safeguard (the equipartition of the codes): each sample's
codes become its own ``softmax(scores / epsilon)``, and the assignments fall on one prototype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config, choice, setting
from ..data.batch import Batch
from ..losses.swav import CODES, swapped_prediction_loss, swav_codes
from ..models.heads import ProjectionMLP
from ..prototypes.base import PrototypeSet
from ..utils import distributed as dist_utils
from ..utils.registry import METHODS
from .base import Encoder, StepOutput
from .prototype_method import PrototypeMethod, build_prototypes

ASSIGNMENT_CROPS = 2


@dataclass
class SwavSettings:
    temperature: float = setting(0.1, "tau, temperature of the predicted assignments softmax(z C^T / tau)", 1e-4)
    epsilon: float = setting(
        0.05, "entropy regularisation of the Sinkhorn-Knopp codes, exp(scores / epsilon): larger gives "
        "smoother codes, and too large a value the uniform codes of a collapsed model", 1e-4)
    sinkhorn_iterations: int = setting(3, "Sinkhorn-Knopp iterations per assignment crop", 1)
    codes: str = choice(
        "sinkhorn", CODES,
        "sinkhorn: codes balanced over the global batch (SwAV); softmax: each sample's own "
        "softmax(scores / epsilon) with no balancing, the ablation that removes SwAV's safeguard "
        "(the assignments fall on one prototype)")
    queue_length: int = setting(
        0, "past embeddings of each assignment crop kept over all processes (each keeps its share), "
        "rescored against the current prototypes and added to the Sinkhorn problem once full; trimmed "
        "to a multiple of the global batch (0: no queue)", 0)
    queue_start_epochs: float = setting(15.0, "epoch from which the queue is filled (it is used once full)", 0.0)


@METHODS.register("swav")
class SwAV(PrototypeMethod):
    name = "swav"
    has_teacher = False
    eval_network_name = "backbone"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {**super().settings(), "swav": SwavSettings}

    @classmethod
    def inactive_settings(cls, cfg: Config) -> dict[str, str]:
        no_teacher = "the method has an EMA teacher (SwAV has none)"
        out = {**super().inactive_settings(cfg), "method.teacher_momentum": no_teacher,
               "method.teacher_momentum_end": no_teacher,
               "method.head.norm_last_layer": "the prototypes are a weight-normalised layer (SwAV's are "
                                              "renormalised after every step)"}
        if cfg.swav.queue_length == 0:
            out["swav.queue_start_epochs"] = "swav.queue_length > 0"
        return out

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        queue = ASSIGNMENT_CROPS * cfg.swav.queue_length * (cfg.method.head.bottleneck_dim + cfg.method.num_prototypes)
        return super().estimate_state_bytes(cfg, rows) + 4 * queue

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.swav
        global_batch = cfg.train.batch_size * dist_utils.world_size()
        queue_rows = (s.queue_length // global_batch) * global_batch // dist_utils.world_size()
        self.register_buffer("queue", torch.zeros(ASSIGNMENT_CROPS, queue_rows, cfg.method.head.bottleneck_dim))
        self.register_buffer("queue_filled", torch.tensor(0))
        self.queue_start = self.epochs_to_steps(s.queue_start_epochs)
        self._pending_queue: torch.Tensor | None = None
        self._batch_rows = 0

    def build_student(self, backbone: nn.Module) -> nn.Module:
        h = self.cfg.method.head
        projector = ProjectionMLP(self.feature_dim, h.hidden_dim, h.bottleneck_dim, h.layers, h.batchnorm,
                                  activation="relu", init="torch")
        return Encoder(backbone, projector, normalize=True)

    def build_prototype_set(self, dim: int) -> PrototypeSet:
        return build_prototypes(self.cfg, dim, self.epochs_to_steps, ema_teacher=False,
                                normalization="renormalize", init="torch")

    # ---- the queue -----------------------------------------------------------------------
    @property
    def queue_in_use(self) -> bool:
        return self.queue.shape[1] > 0 and int(self.queue_filled) >= self.queue.shape[1]

    @torch.no_grad()
    def _stage_queue(self, embeddings: torch.Tensor, step: int) -> None:
        """Prepare the queue after this step: the assignment crops' embeddings ``[2, B, D]`` in
        front, the oldest rows out. Written by :meth:`on_after_optimizer_step` only."""
        if not self.queue.shape[1] or step < self.queue_start:
            return
        rows = self.queue.shape[1]
        self._pending_queue = torch.cat([embeddings.to(self.queue.dtype), self.queue], dim=1)[:, :rows]

    def on_after_optimizer_step(self, step: int) -> None:
        if self._pending_queue is not None:
            self.queue.copy_(self._pending_queue)
            self.queue_filled.copy_(torch.clamp(self.queue_filled + self._batch_rows, max=self.queue.shape[1]))
            self._pending_queue = None
        super().on_after_optimizer_step(step)

    def on_skipped_step(self, step: int) -> None:
        self._pending_queue = None
        super().on_skipped_step(step)

    # ---- the step ------------------------------------------------------------------------
    def probs_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The predicted assignments ``softmax(scores / tau)``."""
        return torch.softmax(scores.float() / self.cfg.swav.temperature, dim=-1)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        s = self.cfg.swav
        crops, n = batch.crops, batch.size
        features, z = self.student(crops)
        z = z.float()
        assign = z[:ASSIGNMENT_CROPS * n].detach()
        gamma = self.update_mixture(assign, step)
        scores = self.student_scores(z).split(n)
        use_queue = self.queue_in_use and s.codes == "sinkhorn"
        codes = []
        with torch.no_grad():
            for a in range(ASSIGNMENT_CROPS):
                if gamma is not None and self.cfg.gmm.targets == "posterior":
                    codes.append(gamma[a * n:(a + 1) * n])
                    continue
                queue_scores = self.teacher_scores(self.queue[a]).float() if use_queue else None
                codes.append(swav_codes(scores[a], s.epsilon, s.sinkhorn_iterations, queue_scores, s.codes))
        loss = swapped_prediction_loss(scores, codes, s.temperature)
        self._batch_rows = n
        self._stage_queue(assign.view(ASSIGNMENT_CROPS, n, -1), step)
        logs: dict[str, float] = {"loss_swapped_prediction": float(loss.detach()), "queue_in_use": float(use_queue)}
        loss = self.koleo_term(loss, logs, z, n)
        logs.update(self.mixture_logs())
        with torch.no_grad():
            predictions = torch.softmax(scores[1].detach() / s.temperature, dim=-1)
        return StepOutput(loss=loss, logs=logs, teacher_probs=codes[0].detach(), student_probs=predictions,
                          embeddings=z[:n].detach(), features=features[:n].detach().float())

    def summary_fields(self) -> dict[str, Any]:
        s = self.cfg.swav
        return {**super().summary_fields(), "codes": s.codes, "epsilon": s.epsilon, "temperature": s.temperature,
                "queue_length": int(self.queue.shape[1]) * dist_utils.world_size()}
