"""DINO's multi-crop self-distillation loss, as pure functions.

Teacher targets for global view j (centred and sharpened):

    q_j = softmax((t_j - c) / tau_t)

Student predictions for crop i: ``log p_i = log_softmax(s_i / tau_s)``. The loss averages the
cross-entropy over every (student crop i, teacher view j) pair except the same view (i == j):

    L = 1/|P| * sum_{(i, j) in P} mean_b [ - sum_k q_j[b, k] * log p_i[b, k] ],
    P = {(i, j) : i in crops, j in global views, i != j}.

The centre follows the batch mean of the teacher logits (all processes) with momentum m:

    c <- m * c + (1 - m) * mean_{b, j} t_j[b].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from .sinkhorn import sinkhorn_knopp  # noqa: F401  (its home is losses/sinkhorn.py; kept importable from here, as documented before)


def teacher_probabilities(teacher_logits: torch.Tensor, temperature: float,
                          center: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax((t - c) / tau_t)`` over the last dimension (no centering when ``center`` is None)."""
    logits = teacher_logits if center is None else teacher_logits - center
    return F.softmax(logits.float() / temperature, dim=-1)


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
              student_temperature: float) -> torch.Tensor:
    """Mean cross-entropy between teacher targets and student predictions over crop pairs
    ``i != j`` (see the module docstring). ``student_logits[i]`` and ``teacher_probs[j]`` are
    ``[B, K]``; the first ``len(teacher_probs)`` student crops are the teacher's views."""
    if not teacher_probs or not student_logits:
        raise ValueError("dino_loss needs at least one teacher view and one student crop")
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    # each crop's log-softmax once, not once per teacher view it is compared with (multi-crop:
    # 2 x fewer B x K passes, and autograd keeps one copy per crop instead of one per pair)
    log_probs = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student_logits]
    for j, q in enumerate(teacher_probs):
        for i, log_p in enumerate(log_probs):
            if i == j:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss has no crop pair with i != j (one crop only)")
    return total / pairs


def updated_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """``m * c + (1 - m) * batch_mean``."""
    return center * momentum + batch_mean * (1.0 - momentum)
