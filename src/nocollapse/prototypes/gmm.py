"""Decoupled prototypes: a Gaussian mixture on the unit sphere fitted by online EM.

"Why Prototypes Collapse" (arXiv 2510.20108) fits the prototypes *outside* the encoder's loss:
before each encoder step, a Gaussian mixture is updated by expectation-maximisation on the
detached, L2-normalised teacher embeddings; the encoder is then trained against the mixture's
(fixed, gradient-free) means. The paper confirms online EM, annealing and responsibility-based
forgetting; the formulas below are this library's reconstruction, with every open choice a
config switch (``gmm.*``):

**E-step (annealed).** For embeddings ``h_i`` and components ``k`` with weights ``pi_k``,
means ``mu_k`` and diagonal variances ``sigma_k^2`` (isotropic optional)::

    log p(h_i, k) = log pi_k - 1/2 sum_d [ (h_id - mu_kd)^2 / sigma_kd^2 + log(2 pi sigma_kd^2) ]
    gamma_ik      = softmax_k( beta_t * log p(h_i, k) )

``beta_t`` rises linearly from ``beta0`` to 1 (``gmm.anneal_epochs``): early on, assignments are
soft so that many components receive statistics. Computed in fp32 with matmuls, chunked over K
(the largest tensor is N x K; no K x K or N x K x D tensor is formed).

**Sufficient statistics** of the batch (N embeddings, summed over all processes)::

    s0_k = 1/N sum_i gamma_ik,   s1_k = 1/N sum_i gamma_ik h_i,   s2_k = 1/N sum_i gamma_ik h_i^2

**Responsibility-based forgetting.** Running statistics ``S`` follow ``S_k <- (1 - eta_k) S_k +
eta * s_k``. With ``forgetting="per_component"`` (default) ``eta_k = eta * min(1, K * s0_k)``: a
component forgets in proportion to the responsibility it received relative to a uniform share, so
a component that receives nothing keeps its statistics (mean, variance *and* weight) and one that
gets at least 1/K of the mass forgets at the full rate. With ``forgetting="global"``
``eta_k = eta`` (classic stepwise EM): an unused component keeps its mean (S1 and S0 decay
together) but its weight decays.

**M-step.** ``m_k = S1_k / S0_k``; the prototype is the mean projected onto the sphere,
``mu_k = m_k / ||m_k||``; the variance is measured around that prototype, with a floor::

    pi_k = S0_k / sum_j S0_j
    sigma_kd^2 = max(S2_kd / S0_k - 2 mu_kd m_kd + mu_kd^2, var_floor)

**Initialisation.** ``init="random"``: random unit means. ``init="data"`` (default): components
are seeded, in index order, with the first teacher embeddings seen (all processes' embeddings,
gathered, so every rank seeds identically), chosen by greedy k-means++ when a batch holds more
embeddings than components remain; until all K are seeded, the E-step only uses the seeded ones.

**Weights that follow the data.** Per-component forgetting keeps an idle component's ``S0``, so
``S0 / sum S0`` keeps its share of the mass. The mixture therefore also keeps an *occupancy*
forgotten globally, ``o_k <- (1 - eta) o_k + eta * s0_k`` (it sums to one), and :attr:`weights`
(what reports and the perplexity read) is ``o``. ``estep_weights`` chooses what the E-step's
``log pi`` uses: ``statistics`` (``S0 / sum S0``) or ``occupancy``.

**Idle components and re-seeding.** The mixture tracks each component's recent *usage*, an
exponential average (rate ``eta``) of the mass it receives relative to a uniform share,
``u_k <- (1 - eta) u_k + eta * K * s0_k`` (1 = a uniform share, 1 at seeding). A component with
``u_k < dead_threshold`` is idle (:meth:`idle_mask`; the one definition the logs, the monitor and
the reports use). ``reseed_dead`` re-seeds at most half a batch of them per update, least used
first, by k-means++ on the gathered batch against the live means. Every re-seed is counted.

**Seeding from a buffer of recent embeddings** (``buffer_size > 0``). Seeds drawn from a randomly
initialised encoder sit in that network's narrow cone, and the embeddings move away as the encoder
learns (docs/results.md, sections 1 and 3). The mixture keeps a ring buffer of the most recent
gathered embeddings and, at :meth:`reseed_from_buffer` (called by the host after its warm-up, and
periodically to refresh idle components), places components on it: ``all`` re-seeds the whole
mixture by k-means++ (or, for large K, a random subset of the buffer) followed by
``lloyd_iterations`` Lloyd passes, and gives every component the mass, mean and variance of its
cluster; ``idle`` re-places only the idle components by k-means++ on the buffer against the live
means. The buffer, its position and the
counts are buffers of the module, so they are saved and restored with it.

**Two-phase update.** :meth:`propose` runs the E-step and the statistics (with their all-reduces)
and returns the responsibilities, the means they were computed against and a
:class:`MixtureUpdate`; :meth:`apply` writes it. A host commits after the loss of the step is
known to be finite, so a skipped step leaves the mixture as it was, and scores its student against
the same means its targets came from. :meth:`em_step` does both at once; the module a host
uses, with the annealing, the seeding schedule and the commit, is
:class:`~nocollapse.prototypes.decoupled.DecoupledPrototypes`. All of it runs in fp32
with autocast disabled: at the variance floor the log-likelihoods differ by tens of nats and bf16
cannot hold them.

Under ``torch.distributed`` only sums are exchanged (all-reduce), so every rank holds the
identical mixture, equal to the one a single process fed the joined batch would hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import distributed as dist_utils
from ..utils.blocks import row_blocks

_STATE = ("means", "variances", "log_weights", "s0", "s1", "s2", "usage", "occupancy")


@dataclass
class MixtureUpdate:
    """The state one online-EM step would write (see :meth:`OnlineGMM.propose`)."""

    tensors: dict[str, torch.Tensor]
    num_seeded: int
    num_reseeds: int
    buffer_rows: torch.Tensor | None      # gathered embeddings to append to the buffer


class _Working:
    """The tensors one step writes, apart from the mixture's own, which stay as they are until
    :meth:`OnlineGMM.apply`.

    The small ones are copies. The four K x D ones (64 MiB each at K = 65,536, D = 256) are
    copies only while seeding (which writes a few rows); once every component is seeded they start
    as the mixture's own tensors, read and never written, and the step replaces each by a new
    tensor written once (:meth:`OnlineGMM._forget_and_accumulate`, :meth:`OnlineGMM._m_step`;
    :meth:`OnlineGMM._reads_own` tells which are still the mixture's)."""

    LARGE = ("means", "variances", "s1", "s2")

    def __init__(self, gmm: "OnlineGMM", share_large: bool = False) -> None:
        for name in _STATE:
            value = getattr(gmm, name)
            setattr(self, name, value if share_large and name in self.LARGE else value.clone())
        self.num_seeded = int(gmm.num_seeded)
        self.num_reseeds = int(gmm.num_reseeds)


class OnlineGMM(nn.Module):
    """K-component Gaussian mixture in D dimensions fitted by online EM (see module docstring).

    All state lives in buffers, so it is saved with the model's ``state_dict``.
    """

    def __init__(self, num_components: int, dim: int, covariance: str = "diagonal",
                 eta: float = 0.01, forgetting: str = "per_component", var_floor: float = 1e-4,
                 init: str = "data", reseed_dead: bool = False, dead_threshold: float = 0.01,
                 chunk_size: int = 4096, seed: int = 0, estep_weights: str = "statistics",
                 buffer_size: int = 0, seeding: str = "auto", lloyd_iterations: int = 3) -> None:
        super().__init__()
        if covariance not in ("diagonal", "isotropic"):
            raise ValueError(f"covariance must be 'diagonal' or 'isotropic', got {covariance!r}")
        if forgetting not in ("per_component", "global"):
            raise ValueError(f"forgetting must be 'per_component' or 'global', got {forgetting!r}")
        if init not in ("random", "data"):
            raise ValueError(f"init must be 'random' or 'data', got {init!r}")
        if estep_weights not in ("statistics", "occupancy"):
            raise ValueError(f"estep_weights must be 'statistics' or 'occupancy', got {estep_weights!r}")
        if seeding not in ("auto", "kmeans++", "random_subset"):
            raise ValueError(f"seeding must be 'auto', 'kmeans++' or 'random_subset', got {seeding!r}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {eta}")
        if buffer_size and buffer_size < num_components:
            raise ValueError(f"buffer_size ({buffer_size}) must be 0 or at least the number of components "
                             f"({num_components})")
        self.num_components, self.dim = num_components, dim
        self.covariance, self.eta, self.forgetting = covariance, eta, forgetting
        self.var_floor, self.init_mode = var_floor, init
        self.reseed_dead, self.dead_threshold = reseed_dead, dead_threshold
        self.chunk_size = max(1, chunk_size)
        self.seed = seed
        self.estep_weights = estep_weights
        self.seeding, self.lloyd_iterations = seeding, lloyd_iterations

        gen = torch.Generator().manual_seed(seed)
        means = F.normalize(torch.randn(num_components, dim, generator=gen), dim=1)
        var0 = 1.0 / dim
        s0 = torch.full((num_components,), 1.0 / num_components)
        self.register_buffer("means", means)
        self.register_buffer("variances", torch.full((num_components, dim), var0))
        self.register_buffer("log_weights", torch.full((num_components,), -math.log(num_components)))
        self.register_buffer("s0", s0)
        self.register_buffer("s1", s0[:, None] * means)
        self.register_buffer("s2", s0[:, None] * (var0 + means**2))
        self.register_buffer("num_seeded", torch.tensor(num_components if init == "random" else 0))
        self.register_buffer("num_updates", torch.tensor(0))
        self.register_buffer("num_reseeds", torch.tensor(0))
        self.register_buffer("usage", torch.ones(num_components))
        self.register_buffer("occupancy", s0.clone())
        self.register_buffer("buffer", torch.zeros(buffer_size, dim))
        self.register_buffer("buffer_filled", torch.tensor(0))
        self.register_buffer("buffer_position", torch.tensor(0))
        self.register_buffer("num_buffer_seedings", torch.tensor(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before these were tracked: usage at a uniform share, occupancy
        # from the statistics, an empty buffer
        state_dict.setdefault(prefix + "usage", torch.ones_like(self.usage))
        if prefix + "occupancy" not in state_dict and prefix + "s0" in state_dict:
            s0 = state_dict[prefix + "s0"]
            state_dict[prefix + "occupancy"] = s0 / s0.sum().clamp_min(1e-30)
        for name in ("buffer", "buffer_filled", "buffer_position", "num_buffer_seedings"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights ``pi`` that follow the data (the globally forgotten occupancy)."""
        return self.occupancy / self.occupancy.sum().clamp_min(1e-30)

    @property
    def seeded(self) -> int:
        return int(self.num_seeded)

    def _active(self, state=None) -> int:
        return max(1, int((state or self).num_seeded))

    def _estep_log_weights(self, state) -> torch.Tensor:
        if self.estep_weights == "occupancy":
            occ = state.occupancy
            return torch.log((occ / occ.sum().clamp_min(1e-30)).clamp_min(1e-30))
        return state.log_weights

    def log_joint(self, h: torch.Tensor, state=None) -> torch.Tensor:
        """``log pi_k + log N(h_i; mu_k, diag sigma_k^2)`` for the seeded components, ``[N, K']``.

        The quadratic form ``sum_d (h_d - mu_d)^2 / s_d`` expands into one matmul per chunk,
        ``[h^2, h] @ [1/s, -2 mu/s]^T`` plus a per-component constant."""
        state = self if state is None else state
        h = h.float()
        active = self._active(state)
        means, variances = state.means[:active], state.variances[:active]
        log_w = self._estep_log_weights(state)[:active]
        const = 0.5 * self.dim * math.log(2 * math.pi)
        if self.covariance == "isotropic":
            inv = 1.0 / variances[:, 0]
            quad = ((h * h).sum(1, keepdim=True) - 2 * h @ means.t() + (means ** 2).sum(1)) * inv
            return log_w - 0.5 * (quad + self.dim * torch.log(variances[:, 0])) - const
        hh = torch.cat([h * h, h], dim=1)                                   # [N, 2D]
        out = h.new_empty(h.shape[0], active)
        for lo in range(0, active, self.chunk_size):
            hi = min(active, lo + self.chunk_size)
            mu, var = means[lo:hi], variances[lo:hi]
            prec = 1.0 / var
            coef = torch.cat([prec, -2.0 * mu * prec], dim=1)              # [k, 2D]
            offset = (mu * mu * prec).sum(1) + torch.log(var).sum(1)
            # log_w - const - 0.5 * offset - 0.5 * hh @ coef^T: the constant row rides in the
            # matrix product's accumulator, so the [N, k] chunk is written once
            bias = (log_w[lo:hi] - const - 0.5 * offset).unsqueeze(0)
            out[:, lo:hi] = torch.addmm(bias, hh, coef.t(), alpha=-0.5)
        return out

    def responsibilities(self, h: torch.Tensor, beta: float = 1.0, state=None) -> torch.Tensor:
        """Annealed posteriors ``softmax_k(beta * log p(h, k))``, ``[N, K]`` (zero for components
        not yet seeded)."""
        with torch.autocast(h.device.type, enabled=False):
            gamma = self.log_joint(h, state)
            # the annealing, the softmax and the cut below, a block of rows at a time, written
            # over the log-joint (one pass over the [N, K] matrix instead of four)
            for rows in row_blocks(*gamma.shape):
                block = gamma[rows]
                if beta != 1.0:
                    block.mul_(beta)
                block.copy_(torch.softmax(block, dim=1))
                # Responsibilities below 1e-20 are set to 0: negligible for the statistics, and
                # they would otherwise underflow to denormal floats, which make CPU matmuls much
                # slower.
                block.masked_fill_(block < 1e-20, 0.0)
        if gamma.shape[1] < self.num_components:
            gamma = F.pad(gamma, (0, self.num_components - gamma.shape[1]))
        return gamma

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, h: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, MixtureUpdate]:
        """The E-step and statistics of one online-EM step on embeddings ``h`` ``[N, D]``
        (L2-normalised here), without changing the mixture.

        Returns this process's responsibilities ``[N, K]``, the means ``[K, D]`` they were
        computed against (the current ones, or the first seeds) and the update to
        :meth:`apply`. Every process must call it (it all-reduces)."""
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [N, {self.dim}], got {tuple(h.shape)}")
        with torch.autocast(h.device.type, enabled=False):
            h = F.normalize(h.float(), dim=1)
            state = _Working(self, share_large=int(self.num_seeded) == self.num_components)
            gathered = None
            if state.num_seeded < self.num_components or self.reseed_dead or self.buffer.shape[0]:
                gathered = dist_utils.all_gather_cat(h)
            seeding = state.num_seeded < self.num_components
            if seeding:
                self._seed_from(state, gathered)
            # the E-step's means: the current ones (committed in place only after the step), or a
            # copy of this step's seeds, which the M-step below overwrites
            scoring_means = state.means.clone() if seeding else self.means
            gamma = self.responsibilities(h, beta, state)
            # [K, 1 + 2D]: sum_i gamma_ik, sum_i gamma_ik h_i, sum_i gamma_ik h_i^2, one matmul per chunk
            stats = self._chunked_t_matmul(gamma, torch.cat([torch.ones_like(h[:, :1]), h, h * h], dim=1))
            count = torch.tensor([float(h.shape[0])], device=h.device)
            dist_utils.all_reduce_sum(stats)
            dist_utils.all_reduce_sum(count)
            stats /= count
            s0, s1, s2 = stats[:, 0], stats[:, 1:1 + self.dim], stats[:, 1 + self.dim:]
            active = self._active(state)
            self._forget_and_accumulate(state, s0[:active], s1[:active], s2[:active], active)
            state.usage[:active] = (1.0 - self.eta) * state.usage[:active] + self.eta * self.num_components * s0[:active]
            state.occupancy.mul_(1.0 - self.eta).add_(s0, alpha=self.eta)
            self._m_step(state)
            if self.reseed_dead and state.num_seeded == self.num_components:
                self._reseed_idle(state, gathered, limit=max(1, gathered.shape[0] // 2))
        update = MixtureUpdate({name: getattr(state, name) for name in _STATE}, state.num_seeded,
                               state.num_reseeds, gathered if self.buffer.shape[0] else None)
        return gamma, scoring_means, update

    @torch.no_grad()
    def apply(self, update: MixtureUpdate, em_step: bool = True) -> None:
        """Write an update returned by :meth:`propose` (``em_step=False``: a re-seeding, which
        :attr:`num_updates` does not count)."""
        for name, value in update.tensors.items():
            getattr(self, name).copy_(value)
        self.num_seeded.fill_(update.num_seeded)
        self.num_reseeds.fill_(update.num_reseeds)
        if update.buffer_rows is not None:
            self._append_to_buffer(update.buffer_rows)
        if em_step:
            self.num_updates += 1

    @torch.no_grad()
    def em_step(self, h: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """One online-EM step on embeddings ``h`` ``[N, D]``: :meth:`propose` then :meth:`apply`.

        Returns this process's responsibilities ``[N, K]`` (computed before the M-step)."""
        gamma, _, update = self.propose(h, beta)
        self.apply(update)
        return gamma

    def _chunked_t_matmul(self, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(gamma.shape[1], x.shape[1])
        for lo in range(0, gamma.shape[1], self.chunk_size):
            hi = min(gamma.shape[1], lo + self.chunk_size)
            out[lo:hi] = gamma[:, lo:hi].t() @ x
        return out

    def _forget_and_accumulate(self, state, s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                               active: int) -> None:
        if self.forgetting == "per_component":
            rate = self.eta * torch.clamp(s0 * self.num_components, max=1.0)
        else:
            rate = torch.full_like(s0, self.eta)
        keep = (1.0 - rate)
        # s <- keep * s + eta * s_batch: in place on a working copy, or, where the step still
        # reads the mixture's own K x D tensor, into a new one written once, block by block
        state.s0[:active].mul_(keep).add_(s0, alpha=self.eta)
        for name, batch in (("s1", s1), ("s2", s2)):
            old = getattr(state, name)
            if self._reads_own(state, name):
                new = torch.empty_like(old)
                for rows in row_blocks(*new.shape):
                    torch.mul(old[rows], keep[rows, None], out=new[rows]).add_(batch[rows], alpha=self.eta)
                setattr(state, name, new)
            else:
                old[:active].mul_(keep[:, None]).add_(batch, alpha=self.eta)

    def _reads_own(self, state, name: str) -> bool:
        """Whether a step's working ``state`` still holds the mixture's own tensor ``name``
        (:class:`_Working`), which the step must replace, not write."""
        return state is not self and getattr(state, name) is getattr(self, name)

    def _m_step(self, state=None) -> None:
        state = self if state is None else state
        for name in ("means", "variances"):          # every row is written below: no copy needed
            if self._reads_own(state, name):
                setattr(state, name, torch.empty_like(getattr(state, name)))
        s0 = state.s0.clamp_min(1e-30)
        # block by block of components, so that each block's chain of K x D steps stays in cache
        for rows in row_blocks(*state.s1.shape):
            mass = s0[rows, None]
            m = state.s1[rows] / mass
            mu = F.normalize(m, dim=1)
            var = state.s2[rows] / mass - 2 * mu * m + mu * mu
            if self.covariance == "isotropic":
                var = var.mean(1, keepdim=True).expand_as(var)
            state.means[rows] = mu
            state.variances[rows] = var.clamp_min(self.var_floor)
        state.log_weights.copy_(torch.log(s0 / s0.sum()))

    def _set_component(self, k: torch.Tensor, x: torch.Tensor, var: torch.Tensor, mass: float | torch.Tensor,
                       state=None) -> None:
        state = self if state is None else state
        mass = mass if isinstance(mass, torch.Tensor) else torch.full((len(k),), float(mass), device=x.device)
        state.means[k] = x
        state.variances[k] = var
        state.s0[k] = mass
        state.s1[k] = mass[:, None] * x
        state.s2[k] = mass[:, None] * (var + x * x)

    def _seed_from(self, state, h_all: torch.Tensor) -> None:
        start = state.num_seeded
        n = min(self.num_components - start, h_all.shape[0])
        rows = self._kmeanspp_rows(h_all, n, state.means[:start], state)
        x = h_all[rows]
        var = h_all.var(dim=0, unbiased=False).mean().clamp_min(self.var_floor)
        k = torch.arange(start, start + n, device=h_all.device)
        self._set_component(k, x, var.expand(n, self.dim), 1.0 / self.num_components, state)
        state.num_seeded += n
        if state.num_seeded == self.num_components:
            self._m_step(state)

    def _generator(self, state, salt: int = 0) -> torch.Generator:
        """A generator seeded from the mixture's seed and progress, identical on every rank."""
        return torch.Generator().manual_seed(self.seed * 7919 + int(state.num_seeded)
                                             + 104729 * int(state.num_reseeds) + 1_000_003 * salt)

    def _kmeanspp_rows(self, h: torch.Tensor, n: int, existing: torch.Tensor, state=None,
                       salt: int = 0) -> torch.Tensor:
        """Greedy k-means++ choice of ``n`` rows of ``h`` (Arthur & Vassilvitskii 2007, with the
        greedy refinement scikit-learn uses): for each pick, ``2 + ln n`` candidates are drawn
        with probability proportional to their squared distance to the nearest mean chosen so far
        (the ``existing`` ones included), and the candidate that most lowers the total squared
        distance is kept. All rows are taken when ``n`` equals their number. The generator is
        seeded from the mixture's seed and progress, so every rank (holding the same gathered
        ``h``) picks the same rows."""
        if n >= h.shape[0]:
            return torch.arange(h.shape[0], device=h.device)
        gen = self._generator(state or self, salt)
        hc = h.cpu()
        if existing.shape[0] > 0:
            d2 = (2.0 - 2.0 * (hc @ existing.cpu().t()).max(dim=1).values).clamp_min(0.0)
        else:
            d2 = torch.ones(hc.shape[0])
        trials = 2 + int(math.log(max(n, 1)))
        picks = []
        for _ in range(n):
            weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
            candidates = torch.multinomial(weights, trials, replacement=True, generator=gen)
            cand_d2 = (2.0 - 2.0 * (hc[candidates] @ hc.t())).clamp_min(0.0)   # [trials, N]
            new_d2 = torch.minimum(d2.unsqueeze(0), cand_d2)
            best = int(new_d2.sum(1).argmin())
            picks.append(int(candidates[best]))
            d2 = new_d2[best]
        return torch.tensor(picks, device=h.device)

    # ---- idle components ------------------------------------------------------------------
    def idle_mask(self) -> torch.Tensor:
        """Boolean ``[K]``: components whose recent usage is below ``dead_threshold`` (and those not
        seeded yet). This is the one definition of an idle component: the step logs, the monitor,
        the report and the re-seeding all use it."""
        return self._idle_mask(self)

    def _idle_mask(self, state) -> torch.Tensor:
        mask = state.usage < self.dead_threshold
        mask[int(state.num_seeded):] = True
        return mask

    def dead_components(self, state=None) -> torch.Tensor:
        """Indices of seeded idle components (:meth:`idle_mask`), least used first."""
        state = self if state is None else state
        active = self._active(state)
        dead = torch.nonzero(self._idle_mask(state)[:active], as_tuple=True)[0]
        return dead[torch.argsort(state.usage[dead], stable=True)]

    def _reseed_idle(self, state, h_all: torch.Tensor, limit: int) -> int:
        """Re-place up to ``limit`` idle components on rows of ``h_all`` by k-means++ against the
        live means; returns how many moved."""
        dead = self.dead_components(state)[:limit]
        if dead.numel() == 0:
            return 0
        dead_mask = torch.zeros(self.num_components, dtype=torch.bool, device=dead.device)
        dead_mask[dead] = True
        rows = self._kmeanspp_rows(h_all, dead.numel(), state.means[~dead_mask], state)
        var = h_all.var(dim=0, unbiased=False).mean().clamp_min(self.var_floor)
        self._set_component(dead, h_all[rows], var.expand(dead.numel(), self.dim), 1.0 / self.num_components, state)
        state.usage[dead] = 1.0
        state.num_reseeds += dead.numel()
        self._m_step(state)
        return int(dead.numel())

    # ---- the embedding buffer -------------------------------------------------------------
    def _append_to_buffer(self, rows: torch.Tensor) -> None:
        size = self.buffer.shape[0]
        rows = rows[-size:]
        pos = int(self.buffer_position)
        idx = (pos + torch.arange(rows.shape[0], device=rows.device)) % size
        self.buffer[idx] = rows.to(self.buffer.dtype)
        self.buffer_position.fill_((pos + rows.shape[0]) % size)
        self.buffer_filled.fill_(min(size, int(self.buffer_filled) + rows.shape[0]))

    def buffered(self) -> torch.Tensor:
        """The buffered embeddings, ``[min(filled, size), D]``."""
        return self.buffer[: int(self.buffer_filled)]

    @torch.no_grad()
    def reseed_from_buffer(self, mode: str = "all") -> int:
        """Place components on the buffered embeddings (identical on every rank: the buffer holds
        gathered rows). ``all``: the whole mixture by k-means++ or a random subset, then Lloyd
        passes, each component taking its cluster's mass, mean and variance; ``idle``: only the
        idle components, by k-means++ against the live means. Returns the number of components
        placed (0 when the buffer holds fewer rows than components)."""
        if mode not in ("all", "idle"):
            raise ValueError(f"mode must be 'all' or 'idle', got {mode!r}")
        data = self.buffered()
        if data.shape[0] < self.num_components:
            return 0
        with torch.autocast(data.device.type, enabled=False):
            data = F.normalize(data.float(), dim=1)
            state = _Working(self)
            if mode == "idle":
                moved = self._reseed_idle(state, data, limit=self.num_components)
            else:
                moved = self._seed_all_by_clustering(state, data)
            update = MixtureUpdate({name: getattr(state, name) for name in _STATE}, state.num_seeded,
                                   state.num_reseeds, None)
        self.apply(update, em_step=False)
        self.num_buffer_seedings += 1
        return moved

    def _seed_all_by_clustering(self, state, data: torch.Tensor) -> int:
        k = self.num_components
        use_kmeanspp = self.seeding == "kmeans++" or (self.seeding == "auto" and k <= 8192)
        if use_kmeanspp:
            rows = self._kmeanspp_rows(data, k, data.new_zeros(0, self.dim), state, salt=1)
        else:
            gen = self._generator(state, salt=2)
            rows = torch.randperm(data.shape[0], generator=gen)[:k].to(data.device)
        centres = data[rows].clone()
        for _ in range(max(0, self.lloyd_iterations)):
            assign = self._nearest(data, centres)
            sums = torch.zeros_like(centres).index_add_(0, assign, data)
            counts = torch.bincount(assign, minlength=k)
            moved = counts > 0
            centres[moved] = F.normalize(sums[moved], dim=1)
        assign = self._nearest(data, centres)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        mass = (counts / data.shape[0]).clamp_min(1.0 / (k * data.shape[0]))
        sq = torch.zeros_like(centres).index_add_(0, assign, (data - centres[assign]) ** 2)
        fallback = data.var(dim=0, unbiased=False).mean()
        var = torch.where(counts[:, None] > 1, sq / counts.clamp_min(1)[:, None], fallback.expand_as(sq))
        var = var.clamp_min(self.var_floor)
        if self.covariance == "isotropic":
            var = var.mean(1, keepdim=True).expand_as(var).contiguous()
        self._set_component(torch.arange(k, device=data.device), centres, var, mass, state)
        state.num_seeded = k
        state.usage.fill_(1.0)
        state.occupancy.copy_(mass / mass.sum())
        state.num_reseeds += k
        self._m_step(state)
        return k

    def _nearest(self, data: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        out = torch.empty(data.shape[0], dtype=torch.long, device=data.device)
        for lo in range(0, data.shape[0], chunk):
            out[lo:lo + chunk] = (data[lo:lo + chunk] @ centres.t()).argmax(dim=1)
        return out

    def extra_repr(self) -> str:
        return (f"K={self.num_components}, D={self.dim}, covariance={self.covariance}, eta={self.eta}, "
                f"forgetting={self.forgetting}, init={self.init_mode}, buffer={self.buffer.shape[0]}")
