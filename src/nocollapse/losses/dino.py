"""DINO's multi-crop self-distillation loss, as pure functions.

Teacher targets for global view j (centred and sharpened):

    q_j = softmax((t_j - c) / tau_t)

Student predictions for crop i: ``log p_i = log_softmax(s_i / tau_s)``. The loss averages the
cross-entropy over every (student crop i, teacher view j) pair except the same view (i == j):

    L = 1/|P| * sum_{(i, j) in P} mean_b [ - sum_k q_j[b, k] * log p_i[b, k] ],
    P = {(i, j) : i in crops, j in global views, i != j}.

The centre follows the batch mean of the teacher logits (all processes) with momentum m:

    c <- m * c + (1 - m) * mean_{b, j} t_j[b].

At the papers' K = 65,536 every pass over a B x K matrix is memory traffic (a 256 x 65,536 fp32
matrix is 64 MiB), so both functions work through the rows in blocks small enough to stay in the
processor's cache, and the loss is one autograd node per crop: the pairs of a crop share their
targets' sum (the cross-entropy is linear in the targets), the forward pass keeps only each row's
log-normaliser, and the backward pass writes the gradient in one B x K tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..utils.blocks import row_blocks
from .sinkhorn import sinkhorn_knopp  # noqa: F401  (its home is losses/sinkhorn.py; kept importable from here, as documented before)


def teacher_probabilities(teacher_logits: torch.Tensor, temperature: float,
                          center: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax((t - c) / tau_t)`` over the last dimension, in fp32 (no centering when ``center``
    is None). Under autograd with logits that need a gradient it is the plain differentiable
    expression; otherwise one fp32 output is written block by block."""
    if torch.is_grad_enabled() and (teacher_logits.requires_grad or (center is not None and center.requires_grad)):
        logits = teacher_logits if center is None else teacher_logits - center
        return F.softmax(logits.float() / temperature, dim=-1)
    with torch.no_grad():
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        shift = None if center is None else center.reshape(1, -1).float()
        for rows in row_blocks(*flat.shape):
            # a fresh fp32 block, so that the in-place division never touches the caller's logits
            block = flat[rows].to(torch.float32, copy=True) if shift is None else flat[rows].float() - shift
            out[rows] = F.softmax(block.div_(temperature), dim=-1)
        return out.reshape(teacher_logits.shape)


class _SoftmaxCrossEntropySum(torch.autograd.Function):
    """``sum_b [ -sum_k Q[b, k] * log_softmax(s / tau)[b, k] ]`` for one crop's logits ``s`` and
    its summed targets ``Q``, in fp32 for any narrower input dtype (fp64 stays fp64).

    With ``lse_b = logsumexp_k(s[b] / tau)`` and ``m_b = sum_k Q[b, k]`` the value is
    ``sum_b (m_b * lse_b - <Q[b], s[b]> / tau)`` and its gradients are

        dL/ds = (m * softmax(s / tau) - Q) / tau,      dL/dQ = -log_softmax(s / tau).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)     # fp32, or fp64 for fp64 inputs
        lse, mass, dot = (torch.empty(logits.shape[0], dtype=dtype, device=logits.device) for _ in range(3))
        with torch.autocast(logits.device.type, enabled=False):      # the row dot products stay fp32
            for block in row_blocks(*logits.shape):
                scores, target = logits[block].to(dtype), targets[block].to(dtype)
                dot[block] = torch.linalg.vecdot(target, scores) / temperature
                mass[block] = target.sum(dim=-1)
                lse[block] = torch.logsumexp(scores / temperature, dim=-1)
        ctx.save_for_backward(logits, targets, lse, mass)
        ctx.temperature = temperature
        return (mass * lse - dot).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, mass = ctx.saved_tensors
        temperature, scale = ctx.temperature, grad.to(lse.dtype)
        grad_logits = grad_targets = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty(logits.shape, dtype=lse.dtype, device=logits.device)
            for block in row_blocks(*logits.shape):
                out = grad_logits[block]
                torch.div(logits[block].to(out.dtype), temperature, out=out)
                out.sub_(lse[block, None]).exp_()
                out.mul_(mass[block, None]).sub_(targets[block]).mul_(scale / temperature)
            grad_logits = grad_logits.to(logits.dtype)
        if ctx.needs_input_grad[1]:
            grad_targets = torch.empty(targets.shape, dtype=lse.dtype, device=targets.device)
            for block in row_blocks(*logits.shape):
                out = grad_targets[block]
                torch.div(logits[block].to(out.dtype), temperature, out=out)
                out.sub_(lse[block, None]).mul_(-scale)
            grad_targets = grad_targets.to(targets.dtype)
        return grad_logits, grad_targets, None


def softmax_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_b [ -sum_k targets[b, k] * log_softmax(logits / temperature)[b, k] ]`` (fp32), for
    ``[B, K]`` logits and targets, without a B x K temporary in the forward pass."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be the same [B, K]")
    return _SoftmaxCrossEntropySum.apply(logits, targets, float(temperature))


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
              student_temperature: float) -> torch.Tensor:
    """Mean cross-entropy between teacher targets and student predictions over crop pairs
    ``i != j`` (see the module docstring). ``student_logits[i]`` and ``teacher_probs[j]`` are
    ``[B, K]``; the first ``len(teacher_probs)`` student crops are the teacher's views.

    The cross-entropy is linear in the targets, so crop ``i`` is compared once with the sum of the
    targets it is paired with, ``Q_i = sum_{j != i} q_j``, and ``L = 1/|P| * sum_i
    CE(Q_i, s_i) / B``, which is the pairwise form above."""
    if not teacher_probs or not student_logits:
        raise ValueError("dino_loss needs at least one teacher view and one student crop")
    views = len(teacher_probs)
    all_targets = None
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, logits in enumerate(student_logits):
        partners = [q for j, q in enumerate(teacher_probs) if j != i]
        if not partners:
            continue
        if len(partners) == 1:
            targets = partners[0]
        elif i >= views:                      # a local crop: paired with every view, one shared sum
            if all_targets is None:
                all_targets = torch.stack(list(teacher_probs)).sum(0)
            targets = all_targets
        else:
            targets = torch.stack(partners).sum(0)
        total = total + softmax_cross_entropy_sum(logits, targets, student_temperature) / logits.shape[0]
        pairs += len(partners)
    if pairs == 0:
        raise ValueError("dino_loss has no crop pair with i != j (one crop only)")
    return total / pairs


def updated_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """``m * c + (1 - m) * batch_mean``."""
    return center * momentum + batch_mean * (1.0 - momentum)
