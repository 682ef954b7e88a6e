"""Reductions over the d x d matrices of Barlow Twins (cross-correlation) and VICReg (covariance).

With the papers' 8192-wide projections such a matrix holds 67 M entries (256 MiB in fp32), so
every elementwise pass over it costs about as much memory traffic as the matrix product that made
it. The sum of squares of the off-diagonal entries is therefore taken as

    sum_{i != j} M_ij^2 = ||M||_F^2 - sum_i M_ii^2,

one reduction over the matrix (its backward one pass, ``2 M``) instead of a mask, a masked copy, a
square and a sum.
"""

from __future__ import annotations

import torch


def off_diagonal_sum_of_squares(matrix: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} M_ij^2`` of a square matrix (see the module doc)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a square matrix is needed, got {tuple(matrix.shape)}")
    return torch.linalg.vector_norm(matrix).square() - torch.diagonal(matrix).square().sum()
