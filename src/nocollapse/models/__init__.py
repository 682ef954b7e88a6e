"""Backbones (registered in the backbone registry) and heads."""

from .backbones import ResNetBackbone, ViTBackbone, build_backbone, count_parameters
from .heads import LearnedPrototypes, ProjectionMLP

__all__ = ["LearnedPrototypes", "ProjectionMLP", "ResNetBackbone", "ViTBackbone", "build_backbone",
           "count_parameters"]
