"""Sinkhorn-Knopp equipartition of assignments over the global batch (SwAV's codes; DINO's
``dino.teacher_norm=sinkhorn`` targets, as DINOv2 offers).

Only normalisation statistics cross processes (the total mass and the per-prototype masses are
all-reduced; each sample's row stays local), as in SwAV's distributed Sinkhorn: the result on
each process equals its rows of the result of one process holding the joined batch.
"""

from __future__ import annotations

import torch

from ..utils import distributed as dist_utils
from ..utils.blocks import row_blocks


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3,
                   row_shift: bool = True) -> torch.Tensor:
    """Balanced teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's alternative to centering).

    Starting from ``P = exp(t / tau_t)`` (B samples x K prototypes, B summed over all processes),
    alternately rescale the columns to equal mass 1/K and the rows to mass 1/B; after the last
    row step each row is a distribution over prototypes (rows sum to 1) while, across the batch,
    every prototype receives about the same total mass (equipartition):

        Q = diag(u) P diag(v),   Q 1_K = 1_B,   1_B^T Q ~= (B / K) 1_K.

    Targets take no gradient (as in SwAV), so the B x K matrix is rescaled in place, block of
    rows by block of rows: each iteration's column and row steps are one pass over the matrix,
    which matters at K = 65,536 (the column sums are taken in the same pass, for the next step).

    ``row_shift`` subtracts each sample's largest logit before the exponential, which keeps any
    logits finite. The limit of the iterations does not depend on it, but a finite number of
    iterations does: the first per-prototype rescaling mixes the samples' rows before any
    per-sample step could cancel their factors. SwAV and DINOv2 exponentiate the scaled scores
    as they are (``row_shift=False``), safe for cosine scores (``|s| / tau`` stays in the tens);
    our DINO teacher has always shifted.
    """
    rows, k = teacher_logits.shape
    q = torch.empty(rows, k, dtype=torch.float32, device=teacher_logits.device)
    total = torch.zeros(1, dtype=torch.float32, device=q.device)
    # one pass over row blocks: the scaled logits (less each row's largest), their exponential,
    # and the total mass
    for block in row_blocks(rows, k):
        out = q[block]
        torch.mul(teacher_logits[block].float(), 1.0 / temperature, out=out)
        if row_shift:
            out.sub_(out.amax(dim=1, keepdim=True))
        out.exp_()
        total += out.sum()
    inverse_total = dist_utils.all_reduce_sum(total).reciprocal()
    batch = torch.tensor([float(rows)], device=q.device)
    total_batch = dist_utils.all_reduce_sum(batch)
    # Every step below multiplies in the same order as the whole-matrix form (total mass 1 first,
    # the final scaling by B last), so that values that underflow (the trainer flushes denormal
    # floats to zero) underflow alike.
    column = torch.zeros(1, k, dtype=torch.float32, device=q.device)
    for block in row_blocks(rows, k):
        column += q[block].mul_(inverse_total).sum(dim=0, keepdim=True)
    if iterations == 0:
        return q.mul_(total_batch)
    column = dist_utils.all_reduce_sum(column)
    for iteration in range(iterations):
        column_scale = (column.clamp_min(1e-30) * k).reciprocal()
        last = iteration == iterations - 1
        next_column = torch.zeros_like(column)
        # one pass per iteration: each block is rescaled by prototype, then by sample, while in
        # cache, and its per-prototype sums for the next iteration are taken on the way
        for block in row_blocks(rows, k):
            out = q[block].mul_(column_scale)
            out.mul_((out.sum(dim=1, keepdim=True).clamp_min(1e-30) * total_batch).reciprocal())
            if last:
                out.mul_(total_batch)
            else:
                next_column += out.sum(dim=0, keepdim=True)
        if not last:
            column = dist_utils.all_reduce_sum(next_column)
    return q
