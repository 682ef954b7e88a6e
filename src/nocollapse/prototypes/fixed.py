"""Fixed prototypes: vectors drawn once from a seed, saved with the model, never trained.

Two constructions:

* :func:`rademacher_codebook` (CPLearn): independent +-1 entries;
* :func:`orthonormal_prototypes` (CLOP): the rows of ``V^T`` from the thin SVD ``G = U S V^T`` of a
  seeded ``C x d`` Gaussian matrix, ``C`` exactly orthonormal rows (so ``d >= C``).

Both come from a generator seeded by the method's own seed, so every process and every machine
draws the same vectors. :class:`FixedPrototypes` holds either as a buffer and scores embeddings
against it in fp32 with autocast off (a bf16 sum over thousands of +-1 terms errs by a large
fraction of a nat).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import PrototypeSet


def rademacher_codebook(dim: int, num_codes: int, seed: int) -> torch.Tensor:
    """A fixed ``[dim, num_codes]`` matrix of independent +-1 entries (fp32) from a generator
    seeded by ``seed``: the same on every process and every machine."""
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (dim, num_codes), generator=gen, dtype=torch.int8)
    return bits.float().mul_(2.0).sub_(1.0)


def orthonormal_prototypes(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[num_classes, dim]`` orthonormal rows (fp32), the same for a given seed on every process."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dim < num_classes:
        raise ValueError(f"{num_classes} orthonormal prototypes need a dimension of at least {num_classes}, "
                         f"got {dim}: raise the projection dimension")
    gen = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    _, _, vh = torch.linalg.svd(gaussian, full_matrices=False)
    return vh.float()


class FixedPrototypes(PrototypeSet):
    """K fixed prototype rows ``[K, D]`` (a buffer, no gradient, never updated).

    ``forward(z) = u @ P^T / temperature`` in fp32 with autocast off, where ``u = z`` or, with
    ``normalize_inputs``, ``z / ||z||`` (cosine scores against unit prototypes)."""

    kind = "fixed"
    fixed = True

    def __init__(self, vectors: torch.Tensor, *, temperature: float = 1.0, normalize_inputs: bool = False) -> None:
        super().__init__()
        if vectors.dim() != 2:
            raise ValueError(f"fixed prototypes must be [K, D], got {tuple(vectors.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.register_buffer("rows", vectors.detach().float().clone())
        self.dim = int(vectors.shape[1])
        self.temperature, self.normalize_inputs = float(temperature), normalize_inputs

    @property
    def num_prototypes(self) -> int:
        """K, the number of fixed rows."""
        return int(self.rows.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            u = F.normalize(z.float(), dim=-1) if self.normalize_inputs else z.float()
            return (u @ self.rows.t()) / self.temperature

    def vectors(self) -> torch.Tensor:
        return self.rows

    def extra_repr(self) -> str:
        return (f"num_prototypes={self.num_prototypes}, dim={self.dim}, temperature={self.temperature:g}, "
                f"normalize_inputs={self.normalize_inputs}")
