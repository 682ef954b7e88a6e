"""Backbones (registered in the backbone registry) and heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import backbones as _backbones
from .backbones import build_backbone, count_parameters
from .heads import HyperdimensionalProjector, ProjectionMLP

if TYPE_CHECKING:  # loaded on first use by __getattr__ below: they import torchvision
    from .resnet import ResNetBackbone
    from .vit import ViTBackbone

__all__ = ["HyperdimensionalProjector", "ProjectionMLP", "ResNetBackbone", "ViTBackbone", "build_backbone",
           "count_parameters"]


def __getattr__(name: str) -> Any:
    # PEP 562: the torchvision-based backbone classes load on first access, through the lazy names
    # of models/backbones.py, not with the package.
    if name in ("ResNetBackbone", "ViTBackbone"):
        return getattr(_backbones, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
