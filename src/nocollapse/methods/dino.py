"""DINO (Caron et al. 2021): self-distillation with an EMA teacher and K prototypes.

student/teacher = backbone -> projection MLP -> L2-normalised bottleneck -> prototype scores.
The student's crops are trained to predict the teacher's targets for the global views
(``losses/dino.py``). Teacher targets are normalised by ``dino.teacher_norm``: ``centering``
(subtract an EMA of the batch-mean logits, then sharpen), ``sinkhorn`` (Sinkhorn-Knopp
equipartition over the global batch, as SwAV and DINOv2 offer) or ``none`` (sharpening only).

With ``method.prototypes=decoupled`` the prototypes are the means of the online-EM mixture
(``methods/prototype_method.py``); teacher targets are a softmax over the cosine similarities to
the means (``gmm.targets=similarity``) or the mixture's posterior responsibilities
(``gmm.targets=posterior``). Centering stays on for decoupled prototypes by default; the
measurements behind that choice are in docs/results.md, section 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..config import Config, choice, setting
from ..data.batch import Batch
from ..losses.dino import dino_loss, dino_prototype_loss, teacher_probabilities, updated_center
from ..losses.sinkhorn import sinkhorn_knopp
from ..utils import distributed as dist_utils
from ..utils.registry import METHODS
from ..utils.schedules import warmup_constant_schedule
from .base import StepOutput
from .prototype_method import PrototypeMethod


@dataclass
class DinoSettings:
    student_temp: float = setting(0.1, "student softmax temperature", 1e-4)
    teacher_temp: float = setting(0.04, "teacher temperature after warm-up", 1e-4)
    warmup_teacher_temp: float = setting(0.04, "teacher temperature at the start", 1e-4)
    warmup_teacher_temp_epochs: float = setting(0.0, "linear teacher-temperature warm-up length", 0.0)
    center_momentum: float = setting(0.9, "momentum of the teacher centre", 0.0, 1.0)
    teacher_norm: str = choice(
        "centering", ("centering", "sinkhorn", "none"),
        "teacher normalisation: EMA centering (DINO), Sinkhorn-Knopp equipartition over the batch "
        "(SwAV / DINOv2), or none (sharpening only)")
    sinkhorn_iterations: int = setting(3, "Sinkhorn-Knopp iterations (teacher_norm=sinkhorn)", 1)


@METHODS.register("dino", default=True)
class DINO(PrototypeMethod):
    name = "dino"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {**super().settings(), "dino": DinoSettings}

    def __init__(self, cfg: Config, backbone, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        d = cfg.dino
        self.teacher_norm = d.teacher_norm
        self.centering = d.teacher_norm == "centering"
        self.register_buffer("center", torch.zeros(1, cfg.method.num_prototypes))
        self._pending_center: torch.Tensor | None = None
        self.teacher_temp = warmup_constant_schedule(
            d.warmup_teacher_temp, d.teacher_temp, self.epochs_to_steps(d.warmup_teacher_temp_epochs),
            self.total_steps)

    def probs_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The teacher's targets: softmax((scores - centre) / final teacher temperature)."""
        return teacher_probabilities(scores.float(), float(self.teacher_temp[-1]),
                                     self.center if self.centering else None)

    def teacher_targets(self, t_logits: torch.Tensor, gamma: torch.Tensor | None, temp: float) -> torch.Tensor:
        if gamma is not None and self.cfg.gmm.targets == "posterior":
            return gamma
        if self.teacher_norm == "sinkhorn":
            return sinkhorn_knopp(t_logits, temp, self.cfg.dino.sinkhorn_iterations)
        return teacher_probabilities(t_logits, temp, self.center if self.centering else None)

    @torch.no_grad()
    def propose_center(self, t_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(t)``, the mean over the global batch (all processes); written
        by :meth:`on_after_optimizer_step`, so a step skipped for a non-finite loss leaves it."""
        batch_sum = t_logits.sum(0, keepdim=True)
        count = torch.tensor([float(t_logits.shape[0])], device=t_logits.device)
        dist_utils.all_reduce_sum(batch_sum)
        dist_utils.all_reduce_sum(count)
        self._pending_center = updated_center(self.center, batch_sum / count, self.cfg.dino.center_momentum)

    def on_after_optimizer_step(self, step: int) -> None:
        if self._pending_center is not None:
            self.center.copy_(self._pending_center)
            self._pending_center = None
        super().on_after_optimizer_step(step)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        crops, n = batch.crops, batch.size
        temp = self.at_step(self.teacher_temp, step)
        with torch.no_grad():
            t_feat, t_emb = self.teacher(crops[:2])
            t_emb = t_emb.float()
            gamma = self.update_mixture(t_emb, step)
            if self.cfg.gmm.targets != "posterior":
                gamma = None      # the responsibilities are not the targets: their B x K goes now
            t_logits = self.teacher_scores(t_emb).float()
            q = self.teacher_targets(t_logits, gamma, temp)
            if self.centering:
                self.propose_center(t_logits)
            # the teacher's logits (and the responsibilities, when they are the targets, which q
            # holds) are not read again: their B x K go before the student's forward pass
            del t_logits, gamma
        _, s_emb = self.student(crops)
        student_temp = self.cfg.dino.student_temp
        factors = self.prototype_set().product_factors(s_emb)
        if factors is None:
            s_logits = self.student_scores(s_emb).float()
            ce = dino_loss(s_logits.split(n), q.split(n), student_temp)
            second_view = s_logits[n:2 * n].detach()
        else:    # the loss makes the logits itself and never holds their whole gradient
            inputs, prototypes = factors
            ce, crop_logits = dino_prototype_loss(inputs, prototypes, q.split(n), student_temp)
            second_view = crop_logits[1]
        logs: dict[str, float] = {"loss_ce": float(ce.detach()), "teacher_temp": temp}
        loss = self.koleo_term(ce, logs, s_emb, n)
        logs.update(self.mixture_logs())

        @torch.no_grad()
        def student_probs() -> torch.Tensor:                # read at log steps only
            return F.softmax(second_view.float() / student_temp, dim=-1)

        return StepOutput(loss=loss, logs=logs, teacher_probs=q[:n].detach(),
                          student_probs=student_probs, embeddings=t_emb[:n].detach(),
                          features=t_feat[:n].detach().float())
