"""SwAV's swapped prediction (Caron et al. 2020), as pure functions.

Scores ``s_v = z_v C^T`` of every crop v (L2-normalised embeddings ``z_v`` against the K
prototypes), codes ``q_a`` of the assignment crops a (the first two, full-resolution crops) from
their detached scores, and the loss: predict each assignment crop's codes from every other crop,

    L = 1/|A| sum_{a in A} 1/(V - 1) sum_{v != a} mean_b [ - sum_k q_a[b, k] log p_v[b, k] ],
    p_v = softmax(s_v / tau).

The codes solve the entropy-regularised transport problem ``max_{Q} Tr(Q^T S) + eps H(Q)`` over
assignments that split the batch equally between the prototypes, approximated by a few
Sinkhorn-Knopp iterations on ``exp(s / eps)``, the scores exponentiated as they are, without a
per-sample shift, as the reference code (``losses/sinkhorn.py``; only the normalising sums cross
processes). Rows of a queue of past embeddings, scored against the current prototypes,
may join the transport problem; only the current batch's codes are kept.

``codes="softmax"`` replaces the transport by each sample's own ``softmax(s / eps)``, with no
equipartition: the failure the constraint exists to prevent (every sample on one prototype).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from .sinkhorn import sinkhorn_knopp

CODES = ("sinkhorn", "softmax")


@torch.no_grad()
def swav_codes(scores: torch.Tensor, epsilon: float, iterations: int = 3, queue_scores: torch.Tensor | None = None,
               codes: str = "sinkhorn") -> torch.Tensor:
    """The codes ``[B, K]`` of one assignment crop from its detached scores ``[B, K]``: Sinkhorn-Knopp
    over the global batch (with ``queue_scores`` ``[Q, K]`` joining the problem), or, with
    ``codes="softmax"``, ``softmax(scores / epsilon)`` per sample (no balancing; the queue is
    unused). Each row sums to 1."""
    if codes not in CODES:
        raise ValueError(f"codes must be one of {CODES}, got {codes!r}")
    scores = scores.detach().float()
    if codes == "softmax":
        return F.softmax(scores / epsilon, dim=-1)
    if queue_scores is not None and queue_scores.shape[0]:
        joined = torch.cat([queue_scores.detach().float(), scores])
        return sinkhorn_knopp(joined, epsilon, iterations, row_shift=False)[-scores.shape[0]:]
    return sinkhorn_knopp(scores, epsilon, iterations, row_shift=False)


def swapped_prediction_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
                            temperature: float) -> torch.Tensor:
    """The swapped prediction loss (see the module doc). ``scores[v]`` ``[B, K]`` for every crop,
    the assignment crops first; ``codes[a]`` ``[B, K]`` for the first ``len(codes)`` crops.
    Computed in fp32 with autocast off."""
    if not codes or len(scores) < 2:
        raise ValueError("the swapped prediction needs at least one assignment crop and one other crop")
    if len(codes) > len(scores):
        raise ValueError(f"{len(codes)} assignment crops but only {len(scores)} crops")
    with torch.autocast(scores[0].device.type, enabled=False):
        log_p = [F.log_softmax(s.float() / temperature, dim=-1) for s in scores]
        total = scores[0].new_zeros((), dtype=torch.float32)
        for a, q in enumerate(codes):
            q = q.detach().float()
            per_crop = [-(q * log_p[v]).sum(dim=-1).mean() for v in range(len(scores)) if v != a]
            total = total + torch.stack(per_crop).sum() / (len(scores) - 1)
        return total / len(codes)
