"""CPLearn (Sansone, Lebailly & Tuytelaars, ICML 2025): a projector onto a fixed random +-1
codebook and an invariance + prior-matching loss (``losses/cplearn.py``).

network = backbone -> ``Linear(d -> f)`` -> ``BatchNorm1d`` -> tanh (``models/heads.py``) -> the
embedding ``h`` (``[n, f]``); logits ``z = h W / tau`` against the codebook ``W`` (``[f, c]``, +-1
entries from a generator seeded by ``cplearn.codebook_seed``: a buffer saved with the model,
never trained, identical on every process). There is no teacher; the two views go through the
same network one after the other (BatchNorm sees each view's batch, as in the release) and the
loss is symmetric without a stop-gradient.

``tau = f / (sqrt(n) ln((1 - eps (c - 1)) / eps))`` is fixed at construction from the training
batch size ``n`` per process (the global batch when ``cplearn.all_reduce_marginal`` is on), so
evaluation at another batch size scores codes with the training temperature. The ``h W`` product
and the loss run in fp32 with autocast off: a bf16 sum of f terms errs by a large fraction of a
nat.

The codes are the method's prototypes (a :class:`~nocollapse.prototypes.fixed.FixedPrototypes`
whose rows are the codes and whose temperature is ``tau``): ``num_prototypes = c``,
``prototype_vectors()`` the codes as rows. They are fixed and unique by construction, so the
uniqueness measures of learned prototypes are not computed for them; code usage, cluster sizes
and the clustering scores of the arg-max codes are. Checkpoints keep the codebook under its
``[f, c]`` name ``codebook``.

Where the paper and the release differ, the release is the default and the paper a switch:
``cplearn.embedding`` (tanh as released; ``l2``: version 1's ``sqrt(f/n)``-scaled L2-normalised
embedding) and ``cplearn.prior`` (``reverse_kl`` as released; ``cross_entropy``: the paper's
``-sum_j (1/c) log pbar_j``). The release is the only public definition of the version the
ICML paper reports, which is why it is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import Config, ConfigError, choice, setting
from ..data.batch import Batch
from ..losses.cplearn import PRIORS, cplearn_loss, cplearn_temperature
from ..models.heads import HyperdimensionalProjector
from ..prototypes.fixed import FixedPrototypes, rademacher_codebook
from ..utils import distributed as dist_utils
from ..utils.registry import METHODS
from .base import Encoder, SSLMethod, StepOutput


@dataclass
class CPLearnSettings:
    embedding_dim: int = setting(2048, "f, the width of the embedding h and of every code", 1)
    num_codes: Optional[int] = setting(None, "c, the number of fixed +-1 codes (default 8 f)", 2)
    beta: float = setting(1.0, "weight of the invariance (cross-view cross-entropy) term", 0.0)
    prior: str = choice("reverse_kl", PRIORS,
                        "prior-matching term: KL(pbar || U) as released, or the paper's -sum_j (1/c) log pbar_j")
    embedding: str = choice("tanh", ("tanh", "l2"),
                            "h = tanh(BN(Linear(x))) as released, or version 1's sqrt(f/n)-scaled "
                            "L2-normalised BN(Linear(x))")
    eps: float = setting(1e-8, "epsilon of the temperature: the off-code probability of a saturated "
                         "assignment", 1e-30, 0.5)
    codebook_seed: int = setting(0, "seed of the random +-1 codebook (independent of train.seed)")
    all_reduce_marginal: bool = setting(
        False, "batch marginals (and the temperature's n) over all processes instead of each "
        "process's own batch (the release uses each process's batch)")

    def codes(self) -> int:
        return int(self.num_codes) if self.num_codes is not None else 8 * self.embedding_dim

    def validate(self, cfg: Config) -> None:
        c = self.codes()
        if not self.eps * (c - 1) < 1.0:
            raise ConfigError(f"cplearn.eps * (c - 1) must be below 1 (eps={self.eps}, c={c})")
        if cfg.views.local_crops:
            raise ConfigError("cplearn trains on two views: set views.local_crops=0 "
                              f"(got {cfg.views.local_crops})")


@METHODS.register("cplearn")
class CPLearn(SSLMethod):
    name = "cplearn"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {"cplearn": CPLearnSettings}

    @classmethod
    def estimate_state_bytes(cls, cfg: Config, rows: int) -> int:
        s = cfg.cplearn
        c = s.codes()
        # the codebook, and per crop the logits, their softmax / log-softmax and gradients (fp32)
        return 4 * (s.embedding_dim * c + 6 * rows * c)

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.cplearn
        self.f, self.c = s.embedding_dim, s.codes()
        self.encoder = Encoder(backbone, HyperdimensionalProjector(
            self.feature_dim, self.f, s.embedding, cfg.train.batch_size), normalize=False)
        n = cfg.train.batch_size * (dist_utils.world_size() if s.all_reduce_marginal else 1)
        self.temperature = cplearn_temperature(self.f, self.c, n, s.eps)
        self.codes = FixedPrototypes(rademacher_codebook(self.f, self.c, s.codebook_seed).t(),
                                     temperature=self.temperature)

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook ``W`` ``[f, c]``: the codes as columns."""
        return self.codes.vectors().t()

    def saved_state_names(self) -> dict[str, tuple[str, bool]]:
        return {"codes.rows": ("codebook", True)}

    # ---- the step ------------------------------------------------------------------------
    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``z = h W / tau`` in fp32 (autocast off)."""
        return self.codes(h)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        view_a, view_b = batch.crops[0], batch.crops[1]
        feat_a, h_a = self.encoder([view_a])
        _, h_b = self.encoder([view_b])
        z_a, z_b = self.code_logits(h_a), self.code_logits(h_b)
        s = self.cfg.cplearn
        loss = cplearn_loss(z_a, z_b, s.beta, s.prior, s.all_reduce_marginal)
        with torch.no_grad():
            p_a, p_b = torch.softmax(z_a, dim=-1), torch.softmax(z_b, dim=-1)
            agree = float((z_a.argmax(1) == z_b.argmax(1)).float().mean())
        return StepOutput(loss=loss, logs={"code_agreement": agree}, teacher_probs=p_a, student_probs=p_b,
                          embeddings=h_a.detach().float(), features=feat_a.detach().float())

    # ---- evaluation ----------------------------------------------------------------------
    def eval_backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_encoder(self) -> nn.Module:
        return self.encoder

    # ---- what the monitor and the reports read ---------------------------------------------
    def uniform_loss(self) -> float:
        """The loss when every sample and view shares the uniform assignment: ``beta ln c`` with
        the reverse-KL prior (``ln c`` for any shared assignment at ``beta = 1``), ``(1 + beta) ln c``
        with the cross-entropy prior."""
        s = self.cfg.cplearn
        extra = 1.0 if s.prior == "cross_entropy" else 0.0
        return (s.beta + extra) * math.log(self.c)

    def summary_fields(self) -> dict[str, Any]:
        s = self.cfg.cplearn
        return {"num_prototypes": self.c, "embedding_dim": self.f, "codebook": "fixed random +-1",
                "temperature": self.temperature, "beta": s.beta, "prior": s.prior, "embedding": s.embedding}

    def describe(self) -> str:
        return f"CPLearn (f={self.f}, c={self.c})"
