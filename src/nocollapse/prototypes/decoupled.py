"""Decoupled prototypes as a plain ``nn.Module`` for any training loop.

:class:`DecoupledPrototypes` is the online-EM mixture of "Why Prototypes Collapse"
(:class:`~nocollapse.prototypes.gmm.OnlineGMM`) with everything a host needs around it: the
annealed inverse temperature of the E-step (by step), the step that seeds the mixture from the
buffer of recent embeddings and the periodic refresh of idle components, and the two-phase
update, so that a step whose loss is not finite changes nothing. Our DINO and CARP use this same
module; another loop uses it where a learned last layer was::

    prototypes = DecoupledPrototypes(4096, 256, anneal_steps=1000)
    for step, views in enumerate(loader):
        h_teacher = teacher_bottleneck(views)            # [V * B, D], view-major
        gamma = prototypes.update(h_teacher, step, views=2)   # EM step on detached inputs
        loss = dino_loss(prototypes(student_bottleneck(views)), prototypes(h_teacher))
        if torch.isfinite(loss):
            loss.backward(); optimizer.step()
            prototypes.commit()                          # write the EM step (and seed / refresh)
        else:
            prototypes.discard()

One instance serves student and teacher: :meth:`forward` scores against the means the step's
targets came from, and gives no gradient to them (they are buffers, not parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PrototypeSet, PrototypeSnapshot
from .gmm import MixtureUpdate, OnlineGMM
from .space import EmbeddingSpace


class DecoupledPrototypes(OnlineGMM, PrototypeSet):
    """K prototypes that are the means of an online-EM Gaussian mixture.

    ``beta0`` and ``anneal_steps``: the E-step's inverse temperature rises linearly from
    ``beta0`` to 1 over the first ``anneal_steps`` steps, ``beta(t) = beta0 + (1 - beta0) *
    min(1, t / anneal_steps)``. With a buffer (``buffer_size > 0``), ``seed_after_steps``
    re-seeds every component on the buffer once that many steps are committed, and
    ``refresh_every_steps`` (0: never) re-places the idle components every that many steps
    after it. The other keyword arguments are those of :class:`OnlineGMM`.

    ``space`` (``"whitened"`` by default) is where the mixture is fitted and scored
    (:mod:`~nocollapse.prototypes.space`): ``"sphere"`` is the paper's, the unit-normalised
    embeddings as they come; ``"whitened"`` first removes the running mean and covariance of the
    teacher embeddings (momentum ``space_momentum``, variance floor ``space_shrinkage`` times the
    mean variance), so that the means stay distinct in heads whose embeddings all sit in one
    narrow cone (lightly's and DINO's heads without batch norm); ``"centered"`` and
    ``"standardized"`` remove only the mean, or the mean and per-dimension scale. The means, and
    so the prototype vectors the diagnostics read, are those of that space. The library's recipes
    set ``gmm.space`` explicitly.

    As a :class:`~nocollapse.prototypes.base.PrototypeSet`: the means are the vectors, the
    mixture weights the usage record, the step's EM proposal is committed after the optimiser
    step and discarded for a skipped one.
    """

    kind = "decoupled"

    def __init__(self, num_prototypes: int, dim: int, *, beta0: float = 1.0, anneal_steps: int = 0,
                 seed_after_steps: int = 0, refresh_every_steps: int = 0, space: str = "whitened",
                 space_momentum: float = 0.99, space_shrinkage: float = 0.01, **mixture_options) -> None:
        super().__init__(num_prototypes, dim, **mixture_options)
        self.embedding_space = EmbeddingSpace(dim, space, space_momentum, space_shrinkage)
        if not 0.0 < beta0 <= 1.0:
            raise ValueError(f"beta0 must be in (0, 1], got {beta0}")
        if anneal_steps < 0 or seed_after_steps < 0 or refresh_every_steps < 0:
            raise ValueError("anneal_steps, seed_after_steps and refresh_every_steps must be >= 0")
        if (seed_after_steps or refresh_every_steps) and not self.buffer.shape[0]:
            raise ValueError("seed_after_steps and refresh_every_steps need a buffer: pass buffer_size "
                             "(for example 4 * num_prototypes)")
        self.beta0, self.anneal_steps = beta0, anneal_steps
        self.seed_after_steps, self.refresh_every_steps = seed_after_steps, refresh_every_steps
        self._pending: MixtureUpdate | None = None
        self._pending_space: dict[str, torch.Tensor] | None = None
        self._pending_step = -1
        self._step_means: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written before the mixture had a space holds means fitted on the sphere:
        # it loads into a sphere mixture (whose statistics are unused), and is refused by any
        # other space, whose scores would compare the sphere's means with transformed embeddings.
        missing = [name for name in self.embedding_space.state_dict()
                   if f"{prefix}embedding_space.{name}" not in state_dict]
        if missing and f"{prefix}means" in state_dict:
            if not self.embedding_space.identity:
                raise ValueError(
                    f"this checkpoint of decoupled prototypes has no embedding-space statistics: it was "
                    f"written before gmm.space existed, and its means live on the sphere. Load it into "
                    f"DecoupledPrototypes(..., space='sphere') (gmm.space=sphere), not space="
                    f"{self.embedding_space.space!r}")
            for name, value in self.embedding_space.state_dict().items():
                state_dict.setdefault(f"{prefix}embedding_space.{name}", value.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def beta_at(self, step: int) -> float:
        """The E-step's inverse temperature at ``step``."""
        if self.anneal_steps <= 0:
            return 1.0
        return self.beta0 + (1.0 - self.beta0) * min(1.0, step / self.anneal_steps)

    @property
    def step_means(self) -> torch.Tensor:
        """The means the current step scores against: those its targets came from while an update
        is pending, the committed ones otherwise."""
        return self._step_means if self._step_means is not None else self.means

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, step: int, views: int = 1) -> torch.Tensor:
        """Propose the EM step of ``step`` on the detached ``embeddings`` ``[views * B, D]``
        (``views`` blocks of one batch, view-major) and return their responsibilities ``[views * B,
        K]`` in the same order. Nothing is written until :meth:`commit`; an update that is not
        committed before the next one is dropped. Under ``torch.distributed`` every process must
        call it (the statistics are all-reduced)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if views < 1 or n % views:
            raise ValueError(f"{n} embeddings do not split into {views} views")
        batch = n // views
        # the mixture sees the rows sample-major, so that rows gathered from several processes come
        # in the order of one process holding the joined batch (the seeding depends on the order)
        h = embeddings.detach().view(views, batch, self.dim).transpose(0, 1).reshape(n, self.dim)
        self._pending_space = self.embedding_space.propose(h)
        h = self.embedding_space(h, self._pending_space)
        gamma, self._step_means, self._pending = self.propose(h, beta=self.beta_at(step))
        self._pending_step = step
        return gamma.view(batch, views, -1).transpose(0, 1).reshape(n, -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Scores ``T(z) @ mu^T`` ``[N, K]`` against :attr:`step_means`, ``T`` the map into the
        mixture's space (the identity on the sphere); the means get no gradient."""
        z = self.embedding_space(z, self._pending_space)
        return z @ self.step_means.detach().t().to(z.dtype)

    def product_factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T(z), means)``: :meth:`forward` as one product; the means get no gradient."""
        return self.embedding_space(z, self._pending_space), self.step_means.detach()

    def ordered_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` against the means taken in the order ``order`` (the K x D means are
        gathered, not the N x K scores)."""
        z = self.embedding_space(z, self._pending_space)
        return z @ self.step_means.detach().index_select(0, order).t().to(z.dtype)

    def ordered_target_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return self.ordered_scores(z, order)

    def normalized_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine scores: :meth:`forward` on L2-normalised ``z``."""
        return self(F.normalize(z, dim=-1))

    @property
    def pending(self) -> bool:
        """Whether an update is waiting for :meth:`commit` or :meth:`discard`."""
        return self._pending is not None

    @torch.no_grad()
    def commit(self) -> None:
        """Write the pending EM step (call it once the step's loss is known to be finite), then
        seed or refresh from the buffer when that is due after this step."""
        if self._pending is not None:
            self.embedding_space.apply(self._pending_space)
            self.apply(self._pending)
        done = self._pending_step + 1
        self.discard()
        if done <= 0:        # nothing was pending (seeding and refresh need a buffer: checked at init)
            return
        if self.seed_after_steps and done == self.seed_after_steps:
            self.reseed_from_buffer("all")
        elif self.refresh_every_steps and done > self.seed_after_steps \
                and (done - self.seed_after_steps) % self.refresh_every_steps == 0:
            self.reseed_from_buffer("idle")

    def discard(self) -> None:
        """Drop the pending update (a skipped step): the mixture stays as it was."""
        self._pending, self._step_means, self._pending_step = None, None, -1
        self._pending_space = None

    # ---- the PrototypeSet interface ------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        """K, the number of mixture components."""
        return self.num_components

    def vectors(self) -> torch.Tensor:
        return self.means

    def target_scores(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def usage_weights(self) -> torch.Tensor:
        return self.weights

    def snapshot(self) -> PrototypeSnapshot:
        """The seeded components only: those not placed yet are no prototypes of the data."""
        seeded = self.seeded
        return PrototypeSnapshot(self.means[:seeded].detach().float().cpu(),
                                 self.weights[:seeded].detach().float().cpu(),
                                 self.idle_mask()[:seeded].detach().cpu(), False)

    def after_optimizer_step(self, step: int, teacher_momentum: float | None = None) -> None:
        self.commit()

    def step_logs(self) -> dict[str, float]:
        """The mixture's counters for the step logs (its weights are logged by the method)."""
        return {"gmm_reseeds": float(self.num_reseeds), "gmm_buffer_seedings": float(self.num_buffer_seedings),
                "gmm_mean_variance": float(self.variances.mean())}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta0={self.beta0}, anneal_steps={self.anneal_steps}, "
                f"seed_after_steps={self.seed_after_steps}, refresh_every_steps={self.refresh_every_steps}")
