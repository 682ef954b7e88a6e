"""DINO (Caron et al. 2021): self-distillation with an EMA teacher and K prototypes.

Teacher targets are normalised by ``dino.teacher_norm``: ``centering`` (DINO: subtract an EMA of
the batch-mean logits, then sharpen), ``sinkhorn`` (Sinkhorn-Knopp equipartition over the
global batch, as SwAV and DINOv2 offer) or ``none`` (sharpening only).

student/teacher = backbone -> projection MLP -> L2-normalised bottleneck -> prototype scores.

``method.prototypes``:

* ``learned`` (DINO): the prototypes are a weight-normalised last layer trained with the
  student and EMA-copied to the teacher; teacher targets are centred and sharpened.
* ``decoupled`` ("Why Prototypes Collapse"): one online-EM Gaussian mixture, fitted on the
  teacher's bottleneck embeddings before every step, provides the prototypes for both networks;
  they receive no gradient and are not in the optimiser. Teacher targets are a softmax over the
  cosine similarities to the means (``gmm.targets=similarity``) or the mixture's posterior
  responsibilities (``gmm.targets=posterior``). The paper drops centering for decoupled
  prototypes; here it stays on by default (``dino.teacher_norm=none`` drops it), because without it
  DINO + decoupled collapsed to one-hot assignments in our runs (one prototype used for all
  digits) -- the fixed means do not stop the encoder from sending every image to one of them.
  Only the encoder can keep the assignments balanced when the prototypes take no gradient; on
  CIFAR-10 centering was not enough (whole batches on ~15 components) and the recipe
  ``cifar10/dino_decoupled`` balances the teacher by Sinkhorn-Knopp (``dino.teacher_norm=sinkhorn``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Config
from ..engine import distributed as dist_utils
from ..engine.schedules import warmup_constant_schedule
from ..losses.dino import dino_loss, sinkhorn_knopp, teacher_probabilities, updated_center
from ..models.heads import LearnedPrototypes, koleo_loss
from ..prototypes.gmm import OnlineGMM
from .base import SSLMethod, StepOutput, ema_update


def build_gmm(cfg: Config, dim: int) -> OnlineGMM:
    g = cfg.gmm
    return OnlineGMM(cfg.method.num_prototypes, dim, covariance=g.covariance, eta=g.eta,
                     forgetting=g.forgetting, var_floor=g.var_floor, init=g.init,
                     reseed_dead=g.reseed_dead, dead_threshold=g.dead_threshold,
                     chunk_size=g.chunk_size, seed=cfg.train.seed)


class PrototypeMethod(SSLMethod):
    """Shared machinery of DINO and CARP: student/teacher encoders, learned or decoupled
    prototypes, EMA, last-layer freezing, the annealing schedule of the mixture."""

    normalize_embeddings = True

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        m = cfg.method
        self.student = self.build_encoder(backbone, normalize=self.normalize_embeddings)
        self.teacher = self.frozen_copy(self.student)
        self.decoupled = m.prototypes == "decoupled"
        dim = m.head.bottleneck_dim
        if self.decoupled:
            self.gmm = build_gmm(cfg, dim)
            self.beta = warmup_constant_schedule(cfg.gmm.beta0, 1.0,
                                                 self.epochs_to_steps(cfg.gmm.anneal_epochs),
                                                 self.total_steps)
        else:
            self.student_prototypes = LearnedPrototypes(dim, m.num_prototypes, m.head.norm_last_layer)
            self.teacher_prototypes = self.frozen_copy(self.student_prototypes)
        self.momentum = self.momentum_schedule()
        self.freeze_steps = 0 if self.decoupled else self.epochs_to_steps(m.freeze_last_layer_epochs)

    # ---- prototypes ----------------------------------------------------------------------
    def prototype_vectors(self) -> torch.Tensor:
        if self.decoupled:
            return self.gmm.means
        return self.teacher_prototypes.vectors().detach()

    def student_scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoupled:
            return z @ self.gmm.means.t().to(z.dtype)
        return self.student_prototypes(z)

    def teacher_scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoupled:
            return z @ self.gmm.means.t().to(z.dtype)
        return self.teacher_prototypes(z)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.teacher_scores(embeddings)

    def assignment_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Softmax over all K scores without temperature (CARP's assignment; DINO overrides)."""
        return torch.softmax(self.scores(embeddings).float(), dim=-1)

    def update_mixture(self, teacher_embeddings: torch.Tensor, step: int, views: int = 2) -> torch.Tensor:
        """(i) of the decoupled scheme: refit the mixture on the detached teacher embeddings.

        ``teacher_embeddings`` holds ``views`` blocks of one batch (view-major). The mixture sees
        them sample-major, so that the rows gathered from several processes come in the same order
        as in one process holding the joined batch (the seeding depends on the order); the
        responsibilities are returned view-major again."""
        beta = float(self.beta[min(step, len(self.beta) - 1)])
        n, dim = teacher_embeddings.shape
        batch = n // views
        h = teacher_embeddings.detach().view(views, batch, dim).transpose(0, 1).reshape(n, dim)
        gamma = self.gmm.update(h, beta=beta)
        return gamma.view(batch, views, -1).transpose(0, 1).reshape(n, -1)

    def mixture_logs(self) -> dict[str, float]:
        if not self.decoupled:
            return {}
        w = self.gmm.weights
        perplexity = torch.exp(-(w * torch.log(w.clamp_min(1e-30))).sum())
        return {"gmm_weight_perplexity": float(perplexity), "gmm_reseeds": float(self.gmm.num_reseeds),
                "gmm_dead": float(self.gmm.dead_components().numel()),
                "gmm_mean_variance": float(self.gmm.variances.mean())}

    def uniform_loss(self) -> float:
        """The loss of a fully collapsed (uniform-assignment) model: log K."""
        return math.log(self.cfg.method.num_prototypes)

    # ---- hooks ---------------------------------------------------------------------------
    def on_after_backward(self, step: int) -> None:
        if not self.decoupled and step < self.freeze_steps:
            for p in self.student_prototypes.parameters():
                p.grad = None

    def on_after_optimizer_step(self, step: int) -> None:
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        ema_update(self.teacher, self.student, m)
        if not self.decoupled:
            ema_update(self.teacher_prototypes, self.student_prototypes, m)

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def eval_encoder(self):
        return self.teacher


class DINO(PrototypeMethod):
    name = "dino"

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        d = cfg.dino
        self.teacher_norm = d.teacher_norm
        self.centering = d.teacher_norm == "centering"
        self.register_buffer("center", torch.zeros(1, cfg.method.num_prototypes))
        self.teacher_temp = warmup_constant_schedule(
            d.warmup_teacher_temp, d.teacher_temp, self.epochs_to_steps(d.warmup_teacher_temp_epochs),
            self.total_steps)
        self.koleo_weight = cfg.method.koleo_weight

    def assignment_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The teacher's targets: softmax((scores - centre) / final teacher temperature)."""
        return teacher_probabilities(self.scores(embeddings).float(), float(self.teacher_temp[-1]),
                                     self.center if self.centering else None)

    def forward(self, crops: Sequence[torch.Tensor], step: int) -> StepOutput:
        d = self.cfg.dino
        temp = float(self.teacher_temp[min(step, len(self.teacher_temp) - 1)])
        with torch.no_grad():
            t_feat, t_emb = self.teacher(crops[:2])
            t_emb = t_emb.float()
            gamma = self.update_mixture(t_emb, step) if self.decoupled else None
            t_logits = self.teacher_scores(t_emb).float()
            if gamma is not None and self.cfg.gmm.targets == "posterior":
                q = gamma
            elif self.teacher_norm == "sinkhorn":
                q = sinkhorn_knopp(t_logits, temp, d.sinkhorn_iterations)
            else:
                q = teacher_probabilities(t_logits, temp, self.center if self.centering else None)
        _, s_emb = self.student(crops)
        s_logits = self.student_scores(s_emb).float()
        batch = crops[0].shape[0]
        ce = dino_loss(s_logits.split(batch), q.split(batch), d.student_temp)
        loss = ce
        logs: dict[str, float] = {"loss_ce": float(ce.detach()), "teacher_temp": temp}
        if self.koleo_weight > 0:
            kp = koleo_loss(self.student_prototypes.vectors())
            loss = loss + self.koleo_weight * kp
            logs["loss_koleo"] = float(kp.detach())
        if self.centering:
            with torch.no_grad():
                batch_sum = t_logits.sum(0, keepdim=True)
                count = torch.tensor([float(t_logits.shape[0])], device=t_logits.device)
                dist_utils.all_reduce_sum(batch_sum)
                dist_utils.all_reduce_sum(count)
                self.center.copy_(updated_center(self.center, batch_sum / count, d.center_momentum))
        logs.update(self.mixture_logs())
        with torch.no_grad():
            student_probs = F.softmax(s_logits[batch:2 * batch] / d.student_temp, dim=-1)
        return StepOutput(loss=loss, logs=logs, teacher_probs=q[:batch].detach(),
                          student_probs=student_probs, embeddings=t_emb[:batch].detach(),
                          features=t_feat[:batch].detach().float())
