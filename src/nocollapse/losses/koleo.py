"""The KoLeo spreading regulariser (Sablayrolles et al. 2019), used on learned prototypes."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def koleo_loss(vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Kozachenko-Leonenko) spreading regulariser on L2-normalised rows:

        L = -1/K sum_i log( min_{j != i} ||u_i - u_j||_2 + eps ),   u_i = v_i / ||v_i||.

    Minimising it pushes every prototype away from its nearest neighbour (the "DINO + KP"
    baseline of Govindarajan et al.). Cost O(K^2 D).
    """
    u = F.normalize(vectors.float(), dim=1)
    sim = u @ u.t()
    sim.fill_diagonal_(-2.0)
    nearest = sim.max(dim=1).values
    dist = torch.sqrt(torch.clamp(2.0 - 2.0 * nearest, min=0.0) + eps)
    return -torch.log(dist + eps).mean()
