"""Cheap assignment-level collapse metrics, computed from tensors a training step already has.

All functions take prototype-assignment probabilities ``p`` of shape ``[N, K]``
(``N`` samples, ``K`` prototypes, rows summing to 1), detach them, and return plain
Python numbers so the result can go straight into a metrics log. Entropies are in
nats. Reductions are done in float64 (the inputs are upcast from half precision
to at least float32 first).

Collapse signatures:

* uniform assignment: every row is (nearly) uniform, ``mean_entropy -> ln K``;
* one-hot assignment to one prototype: ``max_prob -> 1`` and ``effective_prototypes -> 1``;
* partial collapse / dead prototypes: ``effective_prototypes`` and ``argmax_used``
  far below ``min(N, K)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AssignmentAccumulator",
    "assignment_stats",
    "teacher_student_kl",
    "mixture_stats",
    "prototype_utilization",
]

_ROW_SUM_TOL = 1e-2


def _as_probs(probs: Tensor, name: str = "probs") -> Tensor:
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(probs.shape)}")
    if probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(probs.shape)}")
    p = probs.detach()
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point probabilities, got {p.dtype}")
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if float(p.min()) < -1e-6:
        raise ValueError(f"{name} has negative entries: pass softmax(logits), not logits")
    sums = p.sum(dim=1, dtype=torch.float64)
    worst = float((sums - 1.0).abs().max())
    if worst > _ROW_SUM_TOL:
        raise ValueError(
            f"rows of {name} must sum to 1 (worst row is off by {worst:.3g}); "
            "pass softmax(logits) over the prototype dimension"
        )
    return p.clamp_min(0)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy ``-sum p log p`` in nats, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def assignment_stats(probs: Tensor, mass_threshold: float | None = None) -> dict[str, float | int]:
    """Summary statistics of an assignment matrix ``p`` of shape ``[N, K]``.

    With ``p_bar_k = (1/N) sum_i p_ik`` the batch-mean assignment:

    * ``mean_entropy = (1/N) sum_i H(p_i)``, ``H(q) = -sum_k q_k ln q_k`` (nats; ``ln K`` when
      every row is uniform, 0 when every row is one-hot);
    * ``entropy_of_mean = H(p_bar)``;
    * ``effective_prototypes = exp(H(p_bar))`` (between 1 and K);
    * ``argmax_used = #{k : k = argmax_j p_ij for some i}``;
    * ``mass_used = #{k : p_bar_k > mass_threshold}``, default ``mass_threshold = 0.1 / K``
      (a prototype with a tenth of its uniform share);
    * ``max_prob = (1/N) sum_i max_k p_ik``;
    * ``prototype_utilization = argmax_used / K`` (at most ``min(N, K) / K`` for one batch);
    * ``num_samples = N`` and ``num_prototypes = K`` (for the alarms).

    For a set too large to hold as one ``[N, K]`` matrix, feed it in row chunks to an
    :class:`AssignmentAccumulator`, which gives the same numbers.
    """
    acc = AssignmentAccumulator(_as_probs(probs).shape[1])
    acc.add(probs)
    return acc.stats(mass_threshold)


class AssignmentAccumulator:
    """:func:`assignment_stats` over row chunks of an ``[N, K]`` assignment matrix, keeping only
    ``O(K)`` state (the summed assignments and the arg-max counts)."""

    def __init__(self, num_prototypes: int) -> None:
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        self.k = int(num_prototypes)
        self.mass = torch.zeros(self.k, dtype=torch.float64)
        self.argmax_counts = torch.zeros(self.k, dtype=torch.long)
        self.entropy_sum = 0.0
        self.max_prob_sum = 0.0
        self.n = 0

    def add(self, probs: Tensor) -> Tensor:
        """Accumulate a chunk ``[n, K]``; returns its rows' arg-max ``[n]``."""
        p = _as_probs(probs)
        if p.shape[1] != self.k:
            raise ValueError(f"probs must have {self.k} columns, got {p.shape[1]}")
        picks = p.argmax(dim=1)
        self.mass += p.sum(dim=0, dtype=torch.float64).cpu()
        self.argmax_counts += torch.bincount(picks.cpu(), minlength=self.k)
        self.entropy_sum += float(_entropy(p).double().sum())
        self.max_prob_sum += float(p.amax(dim=1).double().sum())
        self.n += int(p.shape[0])
        return picks

    def stats(self, mass_threshold: float | None = None) -> dict[str, float | int]:
        if self.n == 0:
            raise ValueError("no assignments were added")
        threshold = 0.1 / self.k if mass_threshold is None else float(mass_threshold)
        if not threshold >= 0:
            raise ValueError(f"mass_threshold must be >= 0, got {mass_threshold}")
        p_bar = self.mass / self.mass.sum()
        entropy_of_mean = float(_entropy(p_bar))
        argmax_used = int((self.argmax_counts > 0).sum())
        return {
            "mean_entropy": self.entropy_sum / self.n,
            "entropy_of_mean": entropy_of_mean,
            "effective_prototypes": math.exp(entropy_of_mean),
            "argmax_used": argmax_used,
            "mass_used": int((p_bar > threshold).sum()),
            "max_prob": self.max_prob_sum / self.n,
            "prototype_utilization": argmax_used / self.k,
            "num_samples": self.n,
            "num_prototypes": self.k,
        }


def teacher_student_kl(teacher_probs: Tensor, student_scores: Tensor) -> float:
    """Mean KL divergence ``(1/N) sum_i KL(t_i || s_i)`` in nats.

    ``KL(t || s) = sum_k t_k (ln t_k - ln s_k)`` with ``0 ln 0 = 0``.

    Args:
        teacher_probs: ``[N, K]`` teacher probabilities (rows sum to 1).
        student_scores: ``[N, K]`` student log-probabilities *or* logits. They are passed
            through ``log_softmax``, which leaves normalised log-probabilities unchanged and
            turns logits into log-probabilities, so either works.
    """
    t = _as_probs(teacher_probs, "teacher_probs").double()
    if not isinstance(student_scores, Tensor):
        raise TypeError("student_scores must be a torch.Tensor")
    if student_scores.shape != teacher_probs.shape:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and student_scores "
            f"{tuple(student_scores.shape)} must have the same shape"
        )
    s = student_scores.detach().double()
    if bool(torch.isnan(s).any()):
        raise ValueError("student_scores contains NaN")
    log_s = torch.log_softmax(s, dim=1)
    kl = torch.special.xlogy(t, t) - torch.where(t > 0, t * log_s, torch.zeros_like(t))
    return float(kl.sum(dim=1).mean())


def mixture_stats(weights: Tensor, dead_threshold: float | None = None,
                  idle: Tensor | None = None) -> dict[str, float | int | str]:
    """Utilisation of a mixture's weights ``pi`` (e.g. a Gaussian-mixture prototype model).

    ``pi`` is normalised to sum to 1 first.

    * ``perplexity = exp(H(pi))`` (K for uniform weights, 1 for a single component);
    * ``dead``: the number of idle components. With ``idle`` (a boolean ``[K]`` mask from the
      mixture's own usage record, e.g. :meth:`OnlineGMM.idle_mask`) it counts that mask
      (``dead_by = "usage"``); without it, ``#{k : pi_k < dead_threshold}``, default ``0.1 / K``
      (``dead_by = "weight"``, for weights from elsewhere);
    * ``num_components = K``.

    A mixture can be 100 % "unique" while many components are dead, so log this next to
    :func:`~nocollapse.diagnostics.prototypes.unique_prototypes`.
    """
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    w = weights.detach().double().reshape(-1)
    if w.numel() < 1:
        raise ValueError("weights must be non-empty")
    if not bool(torch.isfinite(w).all()) or float(w.min()) < 0:
        raise ValueError("weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    pi = w / total
    k = pi.numel()
    if idle is not None:
        if idle.numel() != k:
            raise ValueError(f"idle must have {k} entries, got {idle.numel()}")
        dead, dead_by = int(idle.bool().sum()), "usage"
    else:
        threshold = 0.1 / k if dead_threshold is None else float(dead_threshold)
        dead, dead_by = int((pi < threshold).sum()), "weight"
    return {
        "perplexity": math.exp(float(_entropy(pi))),
        "dead": dead,
        "dead_by": dead_by,
        "num_components": k,
    }


def prototype_utilization(assignments_or_probs: Tensor, num_prototypes: int) -> float:
    """Fraction of prototypes that are the arg-max of at least one sample.

    ``#{k : k = argmax_j p_ij for some i} / K``. Accepts hard assignments (a 1-D integer
    tensor of prototype indices) or scores/probabilities ``[N, K]`` (arg-max over the last
    dimension). With ``N`` samples it is at most ``min(N, K) / K``: compute it over at
    least ``K`` samples (a queue or a whole epoch) to compare it with 1.
    """
    if num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
    x = assignments_or_probs
    if not isinstance(x, Tensor):
        raise TypeError("assignments_or_probs must be a torch.Tensor")
    x = x.detach()
    if x.ndim == 2:
        if x.shape[1] != num_prototypes:
            raise ValueError(
                f"probabilities have {x.shape[1]} columns but num_prototypes={num_prototypes}"
            )
        idx = x.argmax(dim=1)
    elif x.ndim == 1:
        if x.is_floating_point() or x.is_complex():
            raise ValueError("1-D input must hold integer prototype indices")
        idx = x.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_prototypes):
            raise ValueError(f"assignment indices must lie in [0, {num_prototypes})")
    else:
        raise ValueError(f"expected [N] indices or [N, K] scores, got shape {tuple(x.shape)}")
    if idx.numel() == 0:
        return 0.0
    return int(torch.unique(idx).numel()) / num_prototypes
