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

from ..utils.blocks import ProductGradients, column_blocks, row_blocks
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
        lse, mass, dot = _row_statistics(logits, targets, temperature, dtype)
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


def _row_statistics(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, block by block: ``lse_b = logsumexp(s[b] / tau)``, ``m_b = sum_k Q[b, k]`` and
    ``<Q[b], s[b]> / tau``, in ``dtype``."""
    lse, mass, dot = (torch.empty(logits.shape[0], dtype=dtype, device=logits.device) for _ in range(3))
    with torch.autocast(logits.device.type, enabled=False):      # the row dot products stay fp32
        for block in row_blocks(*logits.shape):
            scores, target = logits[block].to(dtype), targets[block].to(dtype)
            dot[block] = torch.linalg.vecdot(target, scores) / temperature
            mass[block] = target.sum(dim=-1)
            lse[block] = torch.logsumexp(scores / temperature, dim=-1)
    return lse, mass, dot


# one block of prototype columns in the backward pass of the fused node: about this many elements
# (fp32: 4 MiB), and at least this many columns, so that each block's products stay efficient
PRODUCT_BLOCK_ELEMENTS = 1 << 20
PRODUCT_BLOCK_MIN_COLUMNS = 256


class _PrototypeSoftmaxCrossEntropy(torch.autograd.Function):
    """The scores ``s = z @ W^T`` of every student row ``z [R, D]`` (crop by crop, ``B`` rows each)
    against the prototype rows ``W [K, D]`` and the weighted sum over crops ``c`` of
    :class:`_SoftmaxCrossEntropySum` of them, in one node, so that the scores' gradient is never
    whole. With ``Q`` the targets of each row's crop, ``w_c`` the crop's weight,
    ``lse_r = logsumexp(s_r / tau)`` and ``m_r = sum_k Q[r, k]``, the value is
    ``sum_c w_c sum_{r in c} (m_r lse_r - <Q_r, s_r> / tau)`` and, with
    ``G = w (m * softmax(s / tau) - Q) / tau``, the gradients are

        dL/dz = G @ W,      dL/dW = G^T @ z.

    The backward pass forms ``G`` one block of prototype columns ``c`` at a time, adding
    ``G[:, c] @ W[c]`` to ``dL/dz`` (in fp32) and writing ``dL/dW[c] = G[:, c]^T @ z`` before the
    next block; the products run in the dtype of the forward product (bf16 under autocast), as
    the layer's own backward pass would. The targets (the teacher's) get no gradient. The scores
    are returned too, without a gradient, for the monitor's student probabilities."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, temperature: float, batch: int,
                crop_weights: tuple[float, ...], *targets: torch.Tensor):
        logits = F.linear(inputs, weight)              # under the caller's autocast, as the layer
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse, mass = (torch.empty(logits.shape[0], dtype=dtype, device=logits.device) for _ in range(2))
        total = logits.new_zeros((), dtype=dtype)
        for crop, (target, crop_weight) in enumerate(zip(targets, crop_weights)):
            rows = slice(crop * batch, (crop + 1) * batch)
            lse[rows], mass[rows], dot = _row_statistics(logits[rows], target, temperature, dtype)
            total = total + crop_weight * (mass[rows] * lse[rows] - dot).sum()
        ctx.save_for_backward(inputs, weight, logits, lse, mass, *targets)
        ctx.settings = (temperature, batch, crop_weights)
        ctx.mark_non_differentiable(logits)
        return total, logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _unused: torch.Tensor):
        inputs, weight, logits, lse, mass, *targets = ctx.saved_tensors
        temperature, batch, crop_weights = ctx.settings
        need_inputs, need_weight = ctx.needs_input_grad[:2]
        grad_inputs = grad_weight = None
        if need_inputs or need_weight:
            dtype = lse.dtype
            row_scale = torch.cat([torch.full((batch,), crop_weight, dtype=dtype, device=lse.device)
                                   for crop_weight in crop_weights]) * (grad.to(dtype) / temperature)
            gradients = ProductGradients(inputs, weight, logits.dtype, dtype, need_inputs, need_weight)
            with torch.autocast(logits.device.type, enabled=False):
                for cols in column_blocks(*logits.shape, PRODUCT_BLOCK_ELEMENTS, PRODUCT_BLOCK_MIN_COLUMNS):
                    g = logits[:, cols].to(dtype, copy=True).div_(temperature).sub_(lse[:, None]).exp_()
                    g.mul_(mass[:, None])
                    for crop, target in enumerate(targets):
                        g[crop * batch:(crop + 1) * batch].sub_(target[:, cols])
                    gradients.add(g.mul_(row_scale[:, None]), cols)
            grad_inputs, grad_weight = gradients.result()
        return (grad_inputs, grad_weight, None, None, None, *(None for _ in targets))


def softmax_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_b [ -sum_k targets[b, k] * log_softmax(logits / temperature)[b, k] ]`` (fp32), for
    ``[B, K]`` logits and targets, without a B x K temporary in the forward pass."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be the same [B, K]")
    return _SoftmaxCrossEntropySum.apply(logits, targets, float(temperature))


def _crop_targets(crops: int, teacher_probs: Sequence[torch.Tensor]):
    """For each student crop ``i`` paired with at least one view ``j != i``: ``(i, Q_i, pairs)``,
    ``Q_i = sum_{j != i} q_j`` (one shared sum for the local crops, which pair with every view)."""
    views = len(teacher_probs)
    all_targets = None
    for i in range(crops):
        partners = [q for j, q in enumerate(teacher_probs) if j != i]
        if not partners:
            continue
        if len(partners) == 1:
            targets = partners[0]
        elif i >= views:
            if all_targets is None:
                all_targets = torch.stack(list(teacher_probs)).sum(0)
            targets = all_targets
        else:
            targets = torch.stack(partners).sum(0)
        yield i, targets, len(partners)


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
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, targets, paired in _crop_targets(len(student_logits), teacher_probs):
        logits = student_logits[i]
        total = total + softmax_cross_entropy_sum(logits, targets, student_temperature) / logits.shape[0]
        pairs += paired
    if pairs == 0:
        raise ValueError("dino_loss has no crop pair with i != j (one crop only)")
    return total / pairs


def dino_prototype_loss(student_inputs: torch.Tensor, prototypes: torch.Tensor,
                        teacher_probs: Sequence[torch.Tensor],
                        student_temperature: float) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """:func:`dino_loss` of the student logits ``s_i = z_i @ prototypes^T`` of the student rows
    ``student_inputs [crops * B, D]`` (crop by crop), made inside the loss in one node
    (:class:`_PrototypeSoftmaxCrossEntropy`) so that their gradient is never whole. Returns the
    loss and each crop's logits ``[B, K]`` without a gradient (None for a crop in no pair)."""
    if not teacher_probs:
        raise ValueError("dino_loss needs at least one teacher view and one student crop")
    batch = teacher_probs[0].shape[0]
    if student_inputs.dim() != 2 or prototypes.dim() != 2 or student_inputs.shape[1] != prototypes.shape[1]:
        raise ValueError(f"student rows {tuple(student_inputs.shape)} and prototype rows {tuple(prototypes.shape)} "
                         "must be [crops * B, D] and [K, D]")
    if student_inputs.shape[0] % batch or any(q.shape != (batch, prototypes.shape[0]) for q in teacher_probs):
        raise ValueError(f"student rows {tuple(student_inputs.shape)} must be whole crops of the teacher views' "
                         f"{batch} rows, and each view's targets [{batch}, {prototypes.shape[0]}]")
    if torch.is_grad_enabled() and any(q.requires_grad for q in teacher_probs):
        raise ValueError("dino_prototype_loss gives the teacher's targets no gradient: pass them detached")
    crops = list(_crop_targets(student_inputs.shape[0] // batch, teacher_probs))
    if not crops:
        raise ValueError("dino_loss has no crop pair with i != j (one crop only)")
    pairs = sum(paired for _, _, paired in crops)
    # the crops in a pair are consecutive: all of them, or all but a lone teacher view's own (crop 0)
    first = crops[0][0]
    loss, logits = _PrototypeSoftmaxCrossEntropy.apply(
        student_inputs[first * batch:], prototypes, float(student_temperature), batch,
        tuple(1.0 / (batch * pairs) for _ in crops), *(targets for _, targets, _ in crops))
    return loss, [None] * first + list(logits.split(batch))


def updated_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """``m * c + (1 - m) * batch_mean``."""
    return center * momentum + batch_mean * (1.0 - momentum)
