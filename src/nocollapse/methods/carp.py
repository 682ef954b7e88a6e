"""CARP (Silva & Ramirez Rivera, NeurIPS 2023): consistent assignments over random partitions.

student/teacher = backbone -> projection MLP -> 256-d bottleneck (not normalised) -> K prototype
scores. Each step draws a random partition of the K prototypes into blocks of ``carp.block_size``
(drawn on rank 0 from a generator seeded by (seed, step) and broadcast, so every process uses
the same one and a resumed run draws the same ones); the loss is the block-wise consistency
between student crops and teacher views plus the KL of the block marginals (taken over all
processes) to uniform (``losses/carp.py``).

With ``method.prototypes=decoupled`` the prototypes are the means of an online-EM Gaussian
mixture fitted on the L2-normalised teacher bottleneck ("CARP + Dec." of "Why Prototypes
Collapse"); the scores are ``z @ mu^T`` with the unnormalised bottleneck ``z``, as CARP's
weight-normalised layer computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, ConfigError, setting
from ..data.batch import Batch
from ..losses.carp import (block_kl_to_uniform, block_softmax, carp_consistency, carp_prototype_loss, group_by_blocks,
                           to_prototype_order)
from ..utils import distributed as dist_utils
from ..utils.registry import METHODS
from .base import StepOutput
from .prototype_method import PrototypeMethod


@dataclass
class CarpSettings:
    block_size: int = setting(128, "N_B, prototypes per random partition block", 2)
    consistency_weight: float = setting(1.0, "weight of the consistency term", 0.0)
    entropy_weight: float = setting(1.0, "weight of the KL(block marginal || uniform) term", 0.0)

    def validate(self, cfg: Config) -> None:
        if cfg.method.num_prototypes % self.block_size != 0:
            raise ConfigError(f"carp.block_size ({self.block_size}) must divide method.num_prototypes "
                              f"({cfg.method.num_prototypes})")


@METHODS.register("carp")
class CARP(PrototypeMethod):
    name = "carp"
    normalize_embeddings = False

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {**super().settings(), "carp": CarpSettings}

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        self.block_size = cfg.carp.block_size
        self.num_blocks = cfg.method.num_prototypes // self.block_size

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        """The prototype methods' estimate, plus the monitor's full-K teacher probabilities of the
        first view and their copy back in prototype order (``[B, K]`` each, fp32)."""
        monitor = 2 * cfg.train.batch_size * cfg.method.num_prototypes * 4
        return super().estimate_state_bytes(cfg, rows) + monitor

    def partition(self, step: int, device: torch.device) -> torch.Tensor:
        """The random partition of this step, ``[num_blocks, block_size]``, identical on all ranks."""
        k = self.cfg.method.num_prototypes
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        perm = torch.randperm(k, generator=gen).to(device)
        dist_utils.broadcast(perm, src=0)
        return perm.view(self.num_blocks, self.block_size)

    def teacher_block_probs(self, t_scores: torch.Tensor, gamma: torch.Tensor | None,
                            part: torch.Tensor) -> torch.Tensor:
        """The teacher's block probabilities ``[rows, K]``, columns in the partition's order: from
        its prototype scores ``t_scores`` (columns in that order), or from the mixture's posteriors
        (``gmm.targets=posterior``, in prototype order), renormalised within each block."""
        if gamma is not None and self.cfg.gmm.targets == "posterior":
            grouped = group_by_blocks(gamma, part)
            return (grouped / grouped.sum(-1, keepdim=True).clamp_min(1e-30)).reshape(gamma.shape[0], -1)
        return block_softmax(t_scores, self.block_size).permute(1, 0, 2).reshape(t_scores.shape[0], -1)

    @staticmethod
    def block_marginal(s_probs: torch.Tensor, t_probs: torch.Tensor) -> torch.Tensor:
        """Each block's mean probability over every student and teacher row of all processes,
        ``[blocks, N_B]``: this process's row sums, summed over processes (K numbers each, where
        gathering the rows themselves would move M x K), divided by the number of rows."""
        sums = s_probs.sum(1) + t_probs.sum(1)
        rows = (s_probs.shape[1] + t_probs.shape[1]) * dist_utils.world_size()
        return dist_utils.all_reduce_sum_with_grad(sums) / rows

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        c = self.cfg.carp
        crops, n = batch.crops, batch.size
        part = self.partition(step, crops[0].device)
        # every score matrix is made against the prototypes taken block by block, so that the
        # blocks are views of it; only the monitor's full-K probabilities go back to prototype order
        order = part.reshape(-1)
        with torch.no_grad():
            t_feat, t_emb = self.teacher(crops[:2])
            t_emb = t_emb.float()
            gamma = self.update_mixture(nn.functional.normalize(t_emb, dim=-1), step)
            posterior = gamma is not None and self.cfg.gmm.targets == "posterior"
            if not posterior:
                gamma = None      # the responsibilities are not the targets: their B x K goes now
            # the scores once: the monitor's full-K targets and the block targets both read them
            t_scores = self.teacher_scores(t_emb[:n] if posterior else t_emb, order)
            teacher_full = to_prototype_order(torch.softmax(t_scores[:n].float(), dim=-1), order)
            t_probs = self.teacher_block_probs(t_scores, gamma, part)
            del t_scores, gamma                 # their B x K go before the student's forward pass
        _, s_emb = self.student(crops)
        factors = self.prototype_set().product_factors(s_emb)
        if factors is None:
            s_scores = self.student_scores(s_emb, order)
            s_probs = block_softmax(s_scores, self.block_size)
            t_blocks = t_probs.view(t_probs.shape[0], self.num_blocks, self.block_size).permute(1, 0, 2)
            consistency = carp_consistency(list(s_probs.split(n, dim=1)), list(t_blocks.split(n, dim=1)))
            kl = block_kl_to_uniform(self.block_marginal(s_probs, t_blocks))
            combined = c.consistency_weight * consistency + c.entropy_weight * kl
            second_view = s_scores[n:2 * n].detach()
        else:    # the loss makes the scores itself and keeps no B x K temporary besides them
            inputs, rows = factors
            combined, consistency, kl, s_scores = carp_prototype_loss(
                inputs, rows.index_select(0, order), t_probs, n, self.block_size, c.consistency_weight,
                c.entropy_weight)
            second_view = s_scores[n:2 * n]
        logs = {"loss_consistency": float(consistency.detach()), "loss_marginal_kl": float(kl.detach())}
        loss = self.koleo_term(combined, logs, s_emb, n)
        logs.update(self.mixture_logs())

        @torch.no_grad()
        def student_full() -> torch.Tensor:                  # read at log steps only
            return to_prototype_order(torch.softmax(second_view.float(), dim=-1), order)

        return StepOutput(loss=loss, logs=logs, teacher_probs=teacher_full, student_probs=student_full,
                          embeddings=t_emb[:n].detach(), features=t_feat[:n].detach().float())

    def uniform_loss(self) -> float:
        """The loss of a fully collapsed (uniform) model: log N_B (the KL term is 0)."""
        return math.log(self.block_size)
