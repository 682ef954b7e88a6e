"""CPLearn's loss (Sansone, Lebailly & Tuytelaars, ICML 2025, arXiv 2410.04959), as pure functions.

An embedding ``h`` (``[n, f]``) is scored against a fixed codebook ``W`` of ``c`` random +-1 codes
(``[f, c]``); the logits ``z = h W / tau`` give each sample a distribution over codes,
``p_i = softmax(z_i)``. With the temperature

    tau = f / ( sqrt(n) * ln((1 - eps (c - 1)) / eps) )

an embedding lying on a code, ``h = w_j / sqrt(n)``, gets the logit gap ``ln((1 - eps(c-1))/eps)``
and so the "eps-one-hot" assignment ``p_j = 1 - eps (c - 1)``, ``p_k = eps``.

For the two views ``a`` and ``b`` of a batch, with batch marginals ``pbar = mean_i p_i`` and the
cross-entropy ``CE(p -> q) = -mean_i sum_j p_ij log q_ij``, the loss (as the authors release it:
symmetric, no stop-gradient) is

    L = 1/2 [ R(pbar_b) + beta CE(p_b -> p_a) ] + 1/2 [ R(pbar_a) + beta CE(p_a -> p_b) ]

with the prior-matching term ``R`` against the uniform prior ``U = 1/c``:

* ``prior="reverse_kl"`` (released code): ``R(pbar) = KL(pbar || U) = sum_j pbar_j ln(c pbar_j)``,
  0 at ``pbar = U``;
* ``prior="cross_entropy"`` (the paper's form): ``R(pbar) = -sum_j (1/c) ln pbar_j``, ln c at
  ``pbar = U``.

The invariance term ``CE(p_a -> p_b) = H(p_a) + KL(p_a || p_b)`` wants confident assignments
that agree across views; the prior term wants every code used equally over the batch. With the
reverse-KL prior every fully collapsed state (one shared assignment ``p`` for all samples and both
views) scores ``ln c + (beta - 1) H(p)``: exactly ``ln c`` at ``beta = 1``, whatever ``p`` is.
"""

from __future__ import annotations

import math

import torch

from ..utils import distributed as dist_utils

PRIORS = ("reverse_kl", "cross_entropy")


def cplearn_temperature(f: int, c: int, n: int, eps: float = 1e-8) -> float:
    """``tau = f / (sqrt(n) ln((1 - eps (c - 1)) / eps))`` for embedding size ``f``, ``c`` codes and
    ``n`` samples per batch."""
    if f < 1 or c < 2 or n < 1:
        raise ValueError(f"cplearn_temperature needs f >= 1, c >= 2 and n >= 1, got f={f}, c={c}, n={n}")
    if not 0.0 < eps * (c - 1) < 1.0:
        raise ValueError(f"eps * (c - 1) must lie in (0, 1), got eps={eps}, c={c}")
    return f / (math.sqrt(n) * math.log((1.0 - eps * (c - 1)) / eps))


def batch_marginal(probs: torch.Tensor, all_reduce: bool = False) -> torch.Tensor:
    """``pbar = mean_i p_i`` over the local batch, or over the global batch of all processes
    (``all_reduce``, with gradients to every process's samples)."""
    if not all_reduce:
        return probs.mean(0)
    total = dist_utils.all_reduce_sum_with_grad(probs.sum(0))
    count = dist_utils.all_reduce_sum(torch.tensor(float(probs.shape[0]), device=probs.device))
    return total / count


def prior_matching(marginal: torch.Tensor, prior: str = "reverse_kl") -> torch.Tensor:
    """``KL(pbar || U)`` (``reverse_kl``) or ``-sum_j (1/c) ln pbar_j`` (``cross_entropy``)."""
    c = marginal.shape[-1]
    tiny = torch.finfo(marginal.dtype).tiny
    if prior == "reverse_kl":
        return (marginal * torch.log(marginal.clamp_min(tiny) * c)).sum()
    if prior == "cross_entropy":
        return -torch.log(marginal.clamp_min(tiny)).mean()
    raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")


def cross_entropy(target_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``CE(p -> q) = -mean_i sum_j p_ij log q_ij`` (no stop-gradient on either side)."""
    return -(target_probs * log_probs).sum(-1).mean()


def cplearn_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, beta: float = 1.0,
                 prior: str = "reverse_kl", all_reduce_marginal: bool = False) -> torch.Tensor:
    """The symmetric CPLearn loss of two views' logits ``[n, c]``, already divided by ``tau``.

    Computed in fp32 whatever the input dtype. ``all_reduce_marginal`` takes the batch marginals
    over all processes (the released code uses each process's own batch)."""
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"logits_a and logits_b must both be [n, c], got {tuple(logits_a.shape)} "
                         f"and {tuple(logits_b.shape)}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    with torch.autocast(logits_a.device.type, enabled=False):
        log_a = torch.log_softmax(logits_a.float(), dim=-1)
        log_b = torch.log_softmax(logits_b.float(), dim=-1)
        p_a, p_b = log_a.exp(), log_b.exp()
        prior_a = prior_matching(batch_marginal(p_a, all_reduce_marginal), prior)
        prior_b = prior_matching(batch_marginal(p_b, all_reduce_marginal), prior)
        return 0.5 * (prior_b + beta * cross_entropy(p_b, log_a)) + 0.5 * (prior_a + beta * cross_entropy(p_a, log_b))
