"""Data shared by the examples: scikit-learn's digits as flat tensors and a simple augmentation.

The examples run as scripts (``python examples/NAME.py``), so this folder is on ``sys.path``.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


def digit_images() -> torch.Tensor:
    """The 1,797 digits as ``[N, 64]`` floats in [0, 1]."""
    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random pixel noise and masking on flattened 8x8 images."""
    noise = 0.3 * torch.randn(x.shape, generator=gen)
    keep = (torch.rand(x.shape, generator=gen) > 0.2).float()
    return (x + noise) * keep
