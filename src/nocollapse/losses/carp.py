"""CARP's loss (Silva & Ramirez Rivera, NeurIPS 2023): consistency over random partitions of the
prototypes plus a marginal-uniformity term, as pure functions.

The K prototypes are split by a random permutation into K / N_B blocks of N_B. Within block b the
scores of a sample become probabilities by a softmax over the block (no temperature):

    p_b = softmax(logits[partition[b]])                                   (N_B entries)

Consistency between student crop i and teacher view j (i != j), averaged over blocks, samples
and pairs:

    L_cons = mean_{(i,j), b, n} [ -log <p_b^(i)(n), q_b^(j)(n)> ]

Uniformity of each block's marginal over the (gathered) batch of all student and teacher
probabilities, averaged over blocks:

    L_KL = mean_b KL( pbar_b || U(N_B) ) = mean_b [ log N_B + sum_k pbar_bk log pbar_bk ]

A fully collapsed model (uniform probabilities everywhere) scores L_cons = log N_B, L_KL = 0.

At the papers' K = 65,536 each [B, K] matrix is 64-128 MiB. ``carp_prototype_loss`` makes the
student's scores against the prototype rows itself and computes both terms and their gradients
a chunk of whole blocks at a time, so that besides the scores it keeps only a log-normaliser and
an agreement per row and block.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

from ..utils import distributed as dist_utils
from ..utils.blocks import ProductGradients


def group_by_blocks(values: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """``values [B, K]`` and ``partition [n_blocks, N_B]`` (prototype indices) -> the columns of
    each block side by side, ``[B, n_blocks, N_B]``. ``index_select`` rather than
    ``values[:, index]``: the same values, and on CPU the advanced-indexing gather and its
    scatter-add backward are several times slower at large K (docs/results.md, section 19.1)."""
    return values.index_select(1, partition.reshape(-1)).reshape(values.shape[0], *partition.shape)


def block_softmax(block_ordered_logits: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, K]`` logits whose columns already come block by block (columns ``b * N_B`` to
    ``(b + 1) * N_B - 1`` are block ``b``, as scores against the prototypes taken in the
    partition's order are) -> block-softmax probabilities ``[n_blocks, B, N_B]``. The blocks are a
    view of the logits: nothing is gathered."""
    rows, k = block_ordered_logits.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the {k} columns")
    grouped = block_ordered_logits.view(rows, k // block_size, block_size)
    return torch.softmax(grouped.float(), dim=-1).permute(1, 0, 2)


def block_probabilities(logits: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """``logits [B, K]`` in prototype order and ``partition [n_blocks, N_B]`` (prototype
    indices) -> block-softmax probabilities ``[n_blocks, B, N_B]``."""
    return torch.softmax(group_by_blocks(logits, partition).float(), dim=-1).permute(1, 0, 2)


def to_prototype_order(block_ordered: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of taking columns in ``order``: ``[B, K]`` values whose column ``i`` belongs to
    prototype ``order[i]`` -> the same values with column ``k`` belonging to prototype ``k``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return block_ordered.index_select(1, inverse)


def _eps(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps


def carp_consistency(student_probs: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean ``-log <p, q>`` over student crop i / teacher view j pairs with i != j."""
    total = student_probs[0].new_zeros(())
    pairs = 0
    for i, p in enumerate(student_probs):
        for j, q in enumerate(teacher_probs):
            if i == j:
                continue
            eps = _eps(p)
            agreement = (p * q).sum(-1).clamp(eps, 1.0 - eps)
            total = total - torch.log(agreement).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("CARP needs at least one student crop / teacher view pair with i != j")
    return total / pairs


def block_kl_to_uniform(pbar: torch.Tensor) -> torch.Tensor:
    """``pbar [n_blocks, N_B]`` (each row a block marginal) -> mean over blocks of
    KL(pbar_b || U(N_B)) = mean_b [ log N_B + sum_k pbar_bk log pbar_bk ]."""
    eps = _eps(pbar)
    return (math.log(pbar.shape[-1]) + (pbar * torch.log(pbar.clamp(eps, 1.0 - eps))).sum(-1)).mean()


def marginal_kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """``probs [M, n_blocks, N_B]`` (M samples) -> mean over blocks of KL(mean_M probs || uniform)."""
    return block_kl_to_uniform(probs.mean(0))


# one chunk of whole blocks in the fused loss: about this many [rows, columns] elements (fp32: 4 MiB)
CHUNK_ELEMENTS = 1 << 20


def _block_chunks(rows: int, num_blocks: int, block_size: int) -> list[slice]:
    """Consecutive ranges of whole blocks, each of about ``CHUNK_ELEMENTS`` elements over ``rows``."""
    step = max(1, CHUNK_ELEMENTS // max(rows * block_size, 1))
    return [slice(start, min(start + step, num_blocks)) for start in range(0, num_blocks, step)]


class _CarpPrototypeLoss(torch.autograd.Function):
    """``w_c * L_cons + w_kl * L_KL`` (see the module doc) of the scores ``s = z @ W^T`` of the
    student rows ``z [crops * B, D]`` (crop-major) against the prototype rows ``W [K, D]`` taken in
    the partition's order (block ``b`` is columns ``b N_B`` to ``(b + 1) N_B - 1``), and the teacher's
    block probabilities ``Q [views * B, K]`` in the same order. One node: the forward pass keeps
    the scores, each row's log-normaliser per block ``lse [rows, blocks]`` and each pair's
    agreements ``a = <p, q> [pairs, B, blocks]``; with ``P`` pairs and ``n_b`` blocks the backward
    pass forms, a chunk of blocks at a time,

        dL/dp_i = -w_c / (P B n_b) * sum_{j != i} q_j / a_ij  +  w_kl / (n_b R) * (log pbar + 1),
        dL/ds   = p * (dL/dp - <dL/dp, p>_block),
        dL/dz  += dL/ds[:, chunk] @ W[chunk],      dL/dW[chunk] = dL/ds[:, chunk]^T @ z,

    ``R`` the rows of the marginal over all processes (the clamps of the log arguments give zero
    derivative where they bind). The marginal's gradient is summed over processes, as the
    all-reduce with gradient of the unfused form does, so that DDP matches one process."""

    @staticmethod
    def forward(ctx, inputs, weight, teacher, batch: int, block_size: int, consistency_weight: float,
                entropy_weight: float):
        logits = F.linear(inputs, weight)              # under the caller's autocast, as the layer
        rows, k = logits.shape
        views, num_blocks = teacher.shape[0] // batch, k // block_size
        pairs = [(i, j) for i in range(rows // batch) for j in range(views) if i != j]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(rows, num_blocks, dtype=dtype, device=logits.device)
        agreement = torch.empty(len(pairs), batch, num_blocks, dtype=dtype, device=logits.device)
        sums = torch.empty(k, dtype=dtype, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for blocks in _block_chunks(rows, num_blocks, block_size):
                cols = slice(blocks.start * block_size, blocks.stop * block_size)
                scores = logits[:, cols].to(dtype, copy=True).view(rows, -1, block_size)
                lse[:, blocks] = torch.logsumexp(scores, dim=-1)
                probs = scores.sub_(lse[:, blocks, None]).exp_()
                target = teacher[:, cols].to(dtype).view(teacher.shape[0], -1, block_size)
                sums[cols] = (probs.sum(0) + target.sum(0)).reshape(-1)
                for index, (i, j) in enumerate(pairs):
                    agreement[index, :, blocks] = torch.linalg.vecdot(probs[i * batch:(i + 1) * batch],
                                                                      target[j * batch:(j + 1) * batch])
            eps = torch.finfo(dtype).eps
            consistency = -torch.log(agreement.clamp(eps, 1.0 - eps)).mean()
            total_rows = (rows + teacher.shape[0]) * dist_utils.world_size()
            marginal = dist_utils.all_reduce_sum(sums) / total_rows
            kl = block_kl_to_uniform(marginal.view(num_blocks, block_size))
        ctx.save_for_backward(inputs, weight, logits, teacher, lse, agreement, marginal)
        ctx.settings = (batch, block_size, consistency_weight, entropy_weight, pairs, total_rows)
        ctx.mark_non_differentiable(logits)
        loss = consistency_weight * consistency + entropy_weight * kl
        return loss, consistency.detach(), kl.detach(), logits

    @staticmethod
    def backward(ctx, grad, _consistency, _kl, _logits):
        inputs, weight, logits, teacher, lse, agreement, marginal = ctx.saved_tensors
        batch, block_size, consistency_weight, entropy_weight, pairs, total_rows = ctx.settings
        need_inputs, need_weight = ctx.needs_input_grad[:2]
        if not (need_inputs or need_weight):
            return (None,) * 7
        rows, k = logits.shape
        num_blocks, dtype = k // block_size, lse.dtype
        scale = grad.to(dtype)
        eps = torch.finfo(dtype).eps
        # d L / d a: the consistency's -log of the clamped agreement, averaged over pairs, rows, blocks
        clamped = agreement.clamp(eps, 1.0 - eps)
        d_agreement = (-consistency_weight * scale / agreement.numel()) / clamped
        d_agreement = d_agreement * ((agreement >= eps) & (agreement <= 1.0 - eps))
        # d L / d (this process's column sums): the KL of the marginal, summed over processes
        kept = (marginal >= eps) & (marginal <= 1.0 - eps)
        d_sums = entropy_weight * scale * (torch.log(marginal.clamp(eps, 1.0 - eps)) + kept) / (num_blocks * total_rows)
        d_sums = dist_utils.all_reduce_sum(d_sums.contiguous())
        gradients = ProductGradients(inputs, weight, logits.dtype, dtype, need_inputs, need_weight)
        with torch.autocast(logits.device.type, enabled=False):
            for blocks in _block_chunks(rows, num_blocks, block_size):
                cols = slice(blocks.start * block_size, blocks.stop * block_size)
                probs = logits[:, cols].to(dtype, copy=True).view(rows, -1, block_size)
                probs = probs.sub_(lse[:, blocks, None]).exp_()
                target = teacher[:, cols].to(dtype).view(teacher.shape[0], -1, block_size)
                d_probs = d_sums[cols].view(1, -1, block_size).expand_as(probs).clone()
                for index, (i, j) in enumerate(pairs):
                    d_probs[i * batch:(i + 1) * batch].addcmul_(target[j * batch:(j + 1) * batch],
                                                                d_agreement[index, :, blocks, None])
                # the block softmax's backward pass, in place
                inner = torch.linalg.vecdot(d_probs, probs)
                gradients.add(d_probs.sub_(inner[..., None]).mul_(probs).view(rows, -1), cols)
        return (*gradients.result(), None, None, None, None, None)


def carp_prototype_loss(inputs: torch.Tensor, rows_in_block_order: torch.Tensor, teacher_probs: torch.Tensor,
                        batch: int, block_size: int, consistency_weight: float = 1.0, entropy_weight: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CARP's loss ``consistency_weight * L_cons + entropy_weight * L_KL`` of the student scores
    ``inputs @ rows_in_block_order^T`` made inside the loss (see :class:`_CarpPrototypeLoss`).

    ``inputs [crops * batch, D]`` are the student rows crop by crop, the first views of which are
    the teacher's; ``teacher_probs [views * batch, K]`` the teacher's block probabilities with the
    columns in the same block order as the rows. Returns the loss, its two terms (without a
    gradient, for the logs) and the student scores (without a gradient, for the monitor)."""
    if inputs.dim() != 2 or rows_in_block_order.dim() != 2 or inputs.shape[1] != rows_in_block_order.shape[1]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and prototype rows {tuple(rows_in_block_order.shape)} "
                         "must be [rows, D] and [K, D]")
    k = rows_in_block_order.shape[0]
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the {k} prototypes")
    if inputs.shape[0] % batch or teacher_probs.dim() != 2 or teacher_probs.shape[1] != k \
            or teacher_probs.shape[0] % batch:
        raise ValueError(f"inputs {tuple(inputs.shape)} and teacher probabilities {tuple(teacher_probs.shape)} "
                         f"must be whole crops of {batch} rows over the {k} prototypes")
    if not any(i != j for i in range(inputs.shape[0] // batch) for j in range(teacher_probs.shape[0] // batch)):
        raise ValueError("CARP needs at least one student crop / teacher view pair with i != j")
    return _CarpPrototypeLoss.apply(inputs, rows_in_block_order, teacher_probs.detach(), batch, block_size,
                                    float(consistency_weight), float(entropy_weight))
