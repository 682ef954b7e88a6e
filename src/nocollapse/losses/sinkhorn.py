"""Sinkhorn-Knopp equipartition of assignments over the global batch (SwAV's codes; DINO's
``dino.teacher_norm=sinkhorn`` targets, as DINOv2 offers).

Only normalisation statistics cross processes (the total mass and the per-prototype masses are
all-reduced; each sample's row stays local), as in SwAV's distributed Sinkhorn: the result on
each process equals its rows of the result of one process holding the joined batch.
"""

from __future__ import annotations

import torch

from ..utils import distributed as dist_utils


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3,
                   row_shift: bool = True) -> torch.Tensor:
    """Balanced teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's alternative to centering).

    Starting from ``P = exp(t / tau_t)`` (B samples x K prototypes, B summed over all processes),
    alternately rescale the columns to equal mass 1/K and the rows to mass 1/B; after the last
    row step each row is a distribution over prototypes (rows sum to 1) while, across the batch,
    every prototype receives about the same total mass (equipartition):

        Q = diag(u) P diag(v),   Q 1_K = 1_B,   1_B^T Q ~= (B / K) 1_K.

    Targets take no gradient (as in SwAV), so the B x K matrix is rescaled in place: one pass
    per rescaling, which matters at K = 65,536.

    ``row_shift`` subtracts each sample's largest logit before the exponential, which keeps any
    logits finite. The limit of the iterations does not depend on it, but a finite number of
    iterations does: the first per-prototype rescaling mixes the samples' rows before any
    per-sample step could cancel their factors. SwAV and DINOv2 exponentiate the scaled scores
    as they are (``row_shift=False``), safe for cosine scores (``|s| / tau`` stays in the tens);
    our DINO teacher has always shifted.
    """
    q = teacher_logits.float() * (1.0 / temperature)
    if row_shift:
        q -= q.max(dim=1, keepdim=True).values
    q.exp_()
    q.mul_(dist_utils.all_reduce_sum(q.sum().reshape(1)).reciprocal())
    batch = torch.tensor([float(q.shape[0])], device=q.device)
    total_batch = dist_utils.all_reduce_sum(batch)
    k = q.shape[1]
    for _ in range(iterations):
        column = dist_utils.all_reduce_sum(q.sum(dim=0, keepdim=True))
        q.mul_((column.clamp_min(1e-30) * k).reciprocal())
        q.mul_((q.sum(dim=1, keepdim=True).clamp_min(1e-30) * total_batch).reciprocal())
    return q.mul_(total_batch)
