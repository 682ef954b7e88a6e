"""The space decoupled prototypes live in: the unit sphere, or one that removes what all
embeddings share.

A head without batch norm (lightly's stock ``DINOProjectionHead``, DINO's own) gives teacher
embeddings that sit in a narrow cone: their normalised mean has a norm close to one. A mixture
fitted there puts its means inside the cone, so they are near-identical as directions even when
they separate the data, and the greedy cover counts them as one prototype. DINO's learned
prototypes escape this because the centring of the teacher logits and the gradient push them
apart; fitted means cannot leave the data.

:class:`EmbeddingSpace` maps an embedding ``z`` (already L2-normalised by the host) to the space
the mixture is fitted and scored in, ``T(z) = normalize(A (z - m))``:

* ``sphere``: ``T(z) = z`` (the paper's mixture on the unit sphere);
* ``centered``: ``m`` the running mean of the teacher embeddings, ``A = I``, the embedding-space
  counterpart of DINO's running centre of the teacher logits;
* ``standardized``: ``A = diag(1 / sqrt(var_d + lambda))``, the running per-dimension variance;
* ``whitened``: ``A = (C + lambda I)^(-1/2)`` from the running covariance ``C`` (ZCA whitening,
  the symmetric inverse square root, so a space that is already white is left as it is).

``lambda = shrinkage * trace(C) / D`` keeps directions the embeddings do not use from being
blown up to the scale of the ones they do. The statistics are exponential averages (momentum
``momentum``) of the teacher embeddings the mixture is fed, summed over all processes; a step's
statistics are proposed with its EM step and written only when it is committed, and both the
teacher's targets and the student's scores of one step use the transform from before it (the
first step uses its own batch). Student gradients flow through ``T``; its statistics are buffers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import distributed as dist_utils

SPACES = ("sphere", "centered", "standardized", "whitened")


class EmbeddingSpace(nn.Module):
    """Running statistics of the embeddings and the map ``T`` they define (module docstring)."""

    def __init__(self, dim: int, space: str = "sphere", momentum: float = 0.99, shrinkage: float = 0.01) -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"space momentum must be in [0, 1), got {momentum}")
        if shrinkage <= 0.0:
            raise ValueError(f"space shrinkage must be > 0, got {shrinkage}")
        self.dim, self.space, self.momentum, self.shrinkage = dim, space, momentum, shrinkage
        # float64: the covariance is E[z z^T] - m m^T, and in a narrow cone (|m| near 1, variances
        # near 1e-4) float32 would lose four of its seven digits to the subtraction
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second_moment", torch.eye(dim, dtype=torch.float64) / dim)      # E[z z^T]
        self.register_buffer("updates", torch.tensor(0))
        self.register_buffer("transform_matrix", torch.eye(dim))

    @property
    def identity(self) -> bool:
        """Whether ``T`` is the identity (the sphere): no statistics are kept."""
        return self.space == "sphere"

    @torch.no_grad()
    def propose(self, z: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The running statistics after the batch ``z`` ``[N, D]`` (all processes' rows), not written."""
        if self.identity:
            return None
        with torch.autocast(z.device.type, enabled=False):
            z = z.double()
            sums = torch.cat([z.sum(0), (z.t() @ z).flatten(),
                              torch.tensor([float(z.shape[0])], device=z.device)])
            dist_utils.all_reduce_sum(sums)
            n = sums[-1]
            mean = sums[: self.dim] / n
            second = sums[self.dim:-1].view(self.dim, self.dim) / n
            if int(self.updates) > 0:
                rate = 1.0 - self.momentum
                mean = self.mean + rate * (mean - self.mean)
                second = self.second_moment + rate * (second - self.second_moment)
            return {"mean": mean, "second_moment": second,
                    "transform_matrix": self._matrix(mean, second).to(self.transform_matrix.dtype)}

    def _matrix(self, mean: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if self.space == "centered":
            return torch.eye(self.dim, device=mean.device, dtype=mean.dtype)
        cov = second - torch.outer(mean, mean)
        cov = 0.5 * (cov + cov.t())
        floor = self.shrinkage * cov.diagonal().sum().clamp_min(1e-12) / self.dim
        if self.space == "standardized":
            return torch.diag((cov.diagonal().clamp_min(0.0) + floor).rsqrt())
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        inverse_root = (eigenvalues.clamp_min(0.0) + floor).rsqrt()
        return (eigenvectors * inverse_root) @ eigenvectors.t()

    @torch.no_grad()
    def apply(self, proposal: dict[str, torch.Tensor] | None) -> None:
        """Write statistics returned by :meth:`propose`."""
        if proposal is None:
            return
        for name, value in proposal.items():
            getattr(self, name).copy_(value)
        self.updates += 1

    def forward(self, z: torch.Tensor, proposal: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``T(z)`` with the written statistics, or those of ``proposal`` before any are written."""
        if self.identity:
            return z
        source = proposal if (proposal is not None and int(self.updates) == 0) else None
        mean = source["mean"] if source else self.mean
        matrix = source["transform_matrix"] if source else self.transform_matrix
        # in float32 outside autocast: the whitening blows up the directions of small variance,
        # where bfloat16's 8 bits would leave rounding noise of the size of the signal
        with torch.autocast(z.device.type, enabled=False):
            centred = z.float() - mean.float()
            if self.space != "centered":
                centred = centred @ matrix                     # symmetric: row-vector form
            return F.normalize(centred, dim=-1).to(z.dtype)

    def extra_repr(self) -> str:
        return f"space={self.space}, momentum={self.momentum}, shrinkage={self.shrinkage}"
