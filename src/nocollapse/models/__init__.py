"""Backbones (registered in the backbone registry) and heads."""

from .backbones import ResNetBackbone, ViTBackbone, build_backbone, count_parameters
from .heads import HyperdimensionalProjector, ProjectionMLP

__all__ = ["HyperdimensionalProjector", "ProjectionMLP", "ResNetBackbone", "ViTBackbone", "build_backbone",
           "count_parameters"]
