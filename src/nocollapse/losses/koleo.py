"""The KoLeo spreading regulariser (Sablayrolles et al. 2019), on prototypes or embeddings."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def koleo_loss(vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Kozachenko-Leonenko) spreading regulariser on L2-normalised rows:

        L = -1/K sum_i log( min_{j != i} ||u_i - u_j||_2 + eps ),   u_i = v_i / ||v_i||.

    Minimising it pushes every row away from its nearest neighbour (the "DINO + KP" baseline of
    Govindarajan et al. on prototypes; DINOv2's regulariser on embeddings). The neighbour is
    found from the cosine similarities, but its distance is the norm of the difference: the
    closed form sqrt(2 - 2 cos) cancels catastrophically for near neighbours, where the log
    and its 1/d gradient are steepest. Cost O(K^2 D).
    """
    u = F.normalize(vectors.float(), dim=1)
    with torch.no_grad():
        sim = u @ u.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    dist = (u - u[nearest]).norm(dim=1)
    return -torch.log(dist + eps).mean()
