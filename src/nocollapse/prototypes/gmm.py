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

**Re-seeding dead components** (``reseed_dead``, off by default). Seeds drawn from a randomly
initialised encoder sit where its embeddings were, and the embeddings move away as the encoder
learns; with per-component forgetting a component that never receives responsibility keeps its
mean and weight forever, so it is dead without its weight showing it. The mixture therefore
tracks each component's recent *usage*, an exponential average (rate ``eta``) of the mass it
receives relative to a uniform share, ``u_k <- (1 - eta) u_k + eta * K * s0_k`` (1 = a uniform
share, 1 at seeding). A component with ``u_k < dead_threshold`` is dead; at most half a batch of
them, least used first, is re-seeded per update by k-means++ on the gathered batch (against the
live means), with a uniform share of mass and usage reset to 1. Every re-seed is counted.

Under ``torch.distributed`` only sums are exchanged (all-reduce), so every rank holds the
identical mixture, equal to the one a single process fed the joined batch would hold.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import distributed as dist_utils


class OnlineGMM(nn.Module):
    """K-component Gaussian mixture in D dimensions fitted by online EM (see module docstring).

    All state lives in buffers, so it is saved with the model's ``state_dict``.
    """

    def __init__(self, num_components: int, dim: int, covariance: str = "diagonal",
                 eta: float = 0.01, forgetting: str = "per_component", var_floor: float = 1e-4,
                 init: str = "data", reseed_dead: bool = False, dead_threshold: float = 0.01,
                 chunk_size: int = 4096, seed: int = 0) -> None:
        super().__init__()
        if covariance not in ("diagonal", "isotropic"):
            raise ValueError(f"covariance must be 'diagonal' or 'isotropic', got {covariance!r}")
        if forgetting not in ("per_component", "global"):
            raise ValueError(f"forgetting must be 'per_component' or 'global', got {forgetting!r}")
        if init not in ("random", "data"):
            raise ValueError(f"init must be 'random' or 'data', got {init!r}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {eta}")
        self.num_components, self.dim = num_components, dim
        self.covariance, self.eta, self.forgetting = covariance, eta, forgetting
        self.var_floor, self.init_mode = var_floor, init
        self.reseed_dead, self.dead_threshold = reseed_dead, dead_threshold
        self.chunk_size = max(1, chunk_size)
        self.seed = seed

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before usage was tracked: every component starts at a uniform share
        state_dict.setdefault(prefix + "usage", torch.ones_like(self.usage))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def seeded(self) -> int:
        return int(self.num_seeded)

    def _active(self) -> int:
        return max(1, int(self.num_seeded))

    def log_joint(self, h: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(h_i; mu_k, diag sigma_k^2)`` for the seeded components, ``[N, K']``.

        The quadratic form ``sum_d (h_d - mu_d)^2 / s_d`` expands into one matmul per chunk,
        ``[h^2, h] @ [1/s, -2 mu/s]^T`` plus a per-component constant."""
        h = h.float()
        active = self._active()
        const = 0.5 * self.dim * math.log(2 * math.pi)
        if self.covariance == "isotropic":
            inv = 1.0 / self.variances[:active, 0]
            quad = ((h * h).sum(1, keepdim=True) - 2 * h @ self.means[:active].t() + (self.means[:active] ** 2).sum(1)) * inv
            return self.log_weights[:active] - 0.5 * (quad + self.dim * torch.log(self.variances[:active, 0])) - const
        hh = torch.cat([h * h, h], dim=1)                                   # [N, 2D]
        out = h.new_empty(h.shape[0], active)
        for lo in range(0, active, self.chunk_size):
            hi = min(active, lo + self.chunk_size)
            mu, var = self.means[lo:hi], self.variances[lo:hi]
            prec = 1.0 / var
            coef = torch.cat([prec, -2.0 * mu * prec], dim=1)              # [k, 2D]
            offset = (mu * mu * prec).sum(1) + torch.log(var).sum(1)
            out[:, lo:hi] = self.log_weights[lo:hi] - 0.5 * (hh @ coef.t() + offset) - const
        return out

    def responsibilities(self, h: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Annealed posteriors ``softmax_k(beta * log p(h, k))``, ``[N, K]`` (zero for components
        not yet seeded)."""
        gamma = torch.softmax(beta * self.log_joint(h), dim=1)
        # Responsibilities below 1e-20 are set to 0: negligible for the statistics, and they
        # would otherwise underflow to denormal floats, which make CPU matmuls ~5x slower.
        gamma = gamma.masked_fill_(gamma < 1e-20, 0.0)
        if gamma.shape[1] < self.num_components:
            gamma = F.pad(gamma, (0, self.num_components - gamma.shape[1]))
        return gamma

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, h: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """One online-EM step on embeddings ``h`` ``[N, D]`` (L2-normalised here).

        Returns this process's responsibilities ``[N, K]`` (computed before the M-step)."""
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [N, {self.dim}], got {tuple(h.shape)}")
        h = F.normalize(h.float(), dim=1)
        if int(self.num_seeded) < self.num_components:
            self._seed_from(dist_utils.all_gather_cat(h))
        gamma = self.responsibilities(h, beta)
        # [K, 1 + 2D]: sum_i gamma_ik, sum_i gamma_ik h_i, sum_i gamma_ik h_i^2 in one matmul per chunk
        stats = self._chunked_t_matmul(gamma, torch.cat([torch.ones_like(h[:, :1]), h, h * h], dim=1))
        count = torch.tensor([float(h.shape[0])], device=h.device)
        dist_utils.all_reduce_sum(stats)
        dist_utils.all_reduce_sum(count)
        stats /= count
        s0, s1, s2 = stats[:, 0], stats[:, 1:1 + self.dim], stats[:, 1 + self.dim:]
        active = self._active()
        self._forget_and_accumulate(s0[:active], s1[:active], s2[:active], active)
        self.usage[:active] = (1.0 - self.eta) * self.usage[:active] + self.eta * self.num_components * s0[:active]
        self._m_step()
        self.num_updates += 1
        if self.reseed_dead and int(self.num_seeded) == self.num_components:
            self._reseed(dist_utils.all_gather_cat(h))
        return gamma

    def _chunked_t_matmul(self, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(gamma.shape[1], x.shape[1])
        for lo in range(0, gamma.shape[1], self.chunk_size):
            hi = min(gamma.shape[1], lo + self.chunk_size)
            out[lo:hi] = gamma[:, lo:hi].t() @ x
        return out

    def _forget_and_accumulate(self, s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                               active: int) -> None:
        if self.forgetting == "per_component":
            rate = self.eta * torch.clamp(s0 * self.num_components, max=1.0)
        else:
            rate = torch.full_like(s0, self.eta)
        keep = (1.0 - rate)
        self.s0[:active] = keep * self.s0[:active] + self.eta * s0
        self.s1[:active] = keep[:, None] * self.s1[:active] + self.eta * s1
        self.s2[:active] = keep[:, None] * self.s2[:active] + self.eta * s2

    def _m_step(self) -> None:
        s0 = self.s0.clamp_min(1e-30)
        m = self.s1 / s0[:, None]
        mu = F.normalize(m, dim=1)
        var = self.s2 / s0[:, None] - 2 * mu * m + mu * mu
        if self.covariance == "isotropic":
            var = var.mean(1, keepdim=True).expand_as(var)
        self.means.copy_(mu)
        self.variances.copy_(var.clamp_min(self.var_floor))
        self.log_weights.copy_(torch.log(s0 / s0.sum()))

    def _set_component(self, k: torch.Tensor, x: torch.Tensor, var: torch.Tensor, mass: float) -> None:
        self.means[k] = x
        self.variances[k] = var
        self.s0[k] = mass
        self.s1[k] = mass * x
        self.s2[k] = mass * (var + x * x)

    def _seed_from(self, h_all: torch.Tensor) -> None:
        start = int(self.num_seeded)
        n = min(self.num_components - start, h_all.shape[0])
        rows = self._kmeanspp_rows(h_all, n, self.means[:start])
        x = h_all[rows]
        var = h_all.var(dim=0, unbiased=False).mean().clamp_min(self.var_floor)
        k = torch.arange(start, start + n, device=h_all.device)
        self._set_component(k, x, var.expand(n, self.dim), 1.0 / self.num_components)
        self.num_seeded += n
        if int(self.num_seeded) == self.num_components:
            self._m_step()

    def _kmeanspp_rows(self, h: torch.Tensor, n: int, existing: torch.Tensor) -> torch.Tensor:
        """Greedy k-means++ choice of ``n`` rows of ``h`` (Arthur & Vassilvitskii 2007, with the
        greedy refinement scikit-learn uses): for each pick, ``2 + ln n`` candidates are drawn
        with probability proportional to their squared distance to the nearest mean chosen so far
        (the already seeded ``existing`` ones included), and the candidate that most lowers the
        total squared distance is kept. All rows are taken when ``n`` equals their number. The
        generator is seeded from the mixture's seed and progress (seeded and re-seeded counts), so
        every rank (holding the same gathered ``h``) picks the same rows."""
        if n >= h.shape[0]:
            return torch.arange(h.shape[0], device=h.device)
        gen = torch.Generator().manual_seed(self.seed * 7919 + int(self.num_seeded) + 104729 * int(self.num_reseeds))
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

    def idle_mask(self) -> torch.Tensor:
        """Boolean ``[K]``: components whose recent usage is below ``dead_threshold`` (and those not
        seeded yet). This is the one definition of an idle component: the step logs, the monitor,
        the report and the re-seeding all use it. (Per-component forgetting never lowers an idle
        component's weight, so the weights cannot tell.)"""
        mask = self.usage < self.dead_threshold
        mask[int(self.num_seeded):] = True
        return mask

    def dead_components(self) -> torch.Tensor:
        """Indices of seeded idle components (:meth:`idle_mask`), least used first."""
        active = self._active()
        dead = torch.nonzero(self.idle_mask()[:active], as_tuple=True)[0]
        return dead[torch.argsort(self.usage[dead], stable=True)]

    def _reseed(self, h_all: torch.Tensor) -> None:
        dead = self.dead_components()[: max(1, h_all.shape[0] // 2)]
        if dead.numel() == 0:
            return
        dead_mask = torch.zeros(self.num_components, dtype=torch.bool, device=dead.device)
        dead_mask[dead] = True
        rows = self._kmeanspp_rows(h_all, dead.numel(), self.means[~dead_mask])
        var = h_all.var(dim=0, unbiased=False).mean().clamp_min(self.var_floor)
        self._set_component(dead, h_all[rows], var.expand(dead.numel(), self.dim), 1.0 / self.num_components)
        self.usage[dead] = 1.0
        self.num_reseeds += dead.numel()
        self._m_step()

    def extra_repr(self) -> str:
        return (f"K={self.num_components}, D={self.dim}, covariance={self.covariance}, eta={self.eta}, "
                f"forgetting={self.forgetting}, init={self.init_mode}")
