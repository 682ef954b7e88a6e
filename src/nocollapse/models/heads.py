"""Projection heads (the prototypes live in ``nocollapse.prototypes``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ProjectionMLP(nn.Module):
    """``layers`` linear layers ``in -> hidden -> ... -> out`` with an activation (and optional
    BatchNorm) between them; the output is the bottleneck the prototypes live in, or the
    projection a loss compares.

    The keyword options build the heads of the published baselines with the same class:

    * ``activation``: ``"gelu"`` (DINO's head) or ``"relu"`` (SwAV, Barlow Twins, VICReg, BYOL,
      SimSiam);
    * ``hidden_bias``: biases on the layers followed by an activation. A bias right before a
      BatchNorm is cancelled by it, so the baselines' code leaves it out;
    * ``last_bias``: a bias on the last layer (Barlow Twins has none: its loss standardises the
      output, which cancels it);
    * ``output_batchnorm``: a BatchNorm without affine parameters after the last layer
      (SimSiam's projector);
    * ``init``: ``"trunc_normal"`` (std 0.02, zero biases: DINO) or ``"torch"`` (PyTorch's default
      initialisation, as the baselines' reference code).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3,
                 batchnorm: bool = False, *, activation: str = "gelu", hidden_bias: bool = True,
                 last_bias: bool = True, output_batchnorm: bool = False, init: str = "trunc_normal") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("a projection MLP needs at least one layer")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if init not in ("trunc_normal", "torch"):
            raise ValueError(f"init must be 'trunc_normal' or 'torch', got {init!r}")
        blocks: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        for i in range(layers):
            last = i == layers - 1
            blocks.append(nn.Linear(dims[i], dims[i + 1], bias=last_bias if last else hidden_bias))
            if not last:
                if batchnorm:
                    blocks.append(nn.BatchNorm1d(dims[i + 1]))
                blocks.append(ACTIVATIONS[activation]())
        if output_batchnorm:
            blocks.append(nn.BatchNorm1d(out_dim, affine=False))
        self.mlp = nn.Sequential(*blocks)
        if init == "trunc_normal":
            self.apply(_init_linear)

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The projection of ``x`` ``[N, in]``. With ``groups > 1`` the rows are ``groups`` equal
        blocks (the views of one batch, view-major) and every BatchNorm normalises each block with
        its own statistics, as if each view went through the head alone, while the matrix
        products run once on all rows (one weight-gradient product instead of one per view and
        their sum)."""
        if groups == 1:
            return self.mlp(x)
        if x.shape[0] % groups:
            raise ValueError(f"{x.shape[0]} rows do not split into {groups} equal groups")
        for layer in self.mlp:
            if isinstance(layer, nn.BatchNorm1d):
                x = torch.cat([layer(block) for block in x.chunk(groups)])
            else:
                x = layer(x)
        return x

    @classmethod
    def from_config(cls, in_dim: int, cfg: Any) -> "ProjectionMLP":
        """From head settings with ``hidden_dim``, ``bottleneck_dim``, ``layers`` and ``batchnorm``."""
        return cls(in_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.layers, cfg.batchnorm)


class HyperdimensionalProjector(nn.Module):
    """CPLearn's projector: ``Linear(d -> f)`` then ``BatchNorm1d(f)``, then

    * ``embedding="tanh"`` (the authors' release): ``h = tanh(BN(W x + b))``, in (-1, 1)^f;
    * ``embedding="l2"`` (version 1 of the paper): ``h = sqrt(f / n) * BN(W x + b) / ||BN(W x + b)||``,
      so that ``||h|| = ||w|| / sqrt(n)`` for a +-1 code ``w`` and ``n = batch_size``.
    """

    def __init__(self, in_dim: int, dim: int, embedding: str = "tanh", batch_size: int = 1) -> None:
        super().__init__()
        if embedding not in ("tanh", "l2"):
            raise ValueError(f"embedding must be 'tanh' or 'l2', got {embedding!r}")
        self.linear = nn.Linear(in_dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.embedding = embedding
        self.scale = math.sqrt(dim / batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.linear(x))
        if self.embedding == "tanh":
            return torch.tanh(y)
        return self.scale * F.normalize(y, dim=-1)
