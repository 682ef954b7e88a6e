"""Backbones: torchvision ResNets with a width multiplier and a CIFAR stem, and small ViTs.

Every backbone maps images ``[B, 3, H, W]`` to pooled features ``[B, feature_dim]`` and exposes
``feature_dim``.

The networks themselves live in :mod:`.resnet` and :mod:`.vit`, which import torchvision; this
module registers them by name and imports them only when one is built (or when
``ResNetBackbone`` / ``ViTBackbone`` is looked up here), so that registering the built-in
backbones does not load torchvision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..utils.registry import BACKBONES

if TYPE_CHECKING:  # what type checkers see of the names __getattr__ below loads on first use
    from .resnet import ResNetBackbone
    from .vit import ViTBackbone

# The registered names; their layouts are ``resnet.RESNETS`` and ``vit.VITS``.
_RESNET_NAMES = ("resnet18", "resnet34", "resnet50")
_VIT_NAMES = ("vit_tiny", "vit_small")


def _resnet(depth: str):
    def build(cfg: Any, image_size: int) -> nn.Module:
        from .resnet import ResNetBackbone

        cifar = cfg.stem == "cifar" or (cfg.stem == "auto" and image_size < 96)
        return ResNetBackbone(depth, cfg.width_multiplier, cifar_stem=cifar, channels_last=cfg.channels_last)
    return build


def _vit(name: str):
    def build(cfg: Any, image_size: int) -> nn.Module:
        from .vit import ViTBackbone

        return ViTBackbone(name, image_size, cfg.patch_size)
    return build


for _name in _RESNET_NAMES:
    BACKBONES.register(_name, _resnet(_name), default=_name == "resnet18")
for _name in _VIT_NAMES:
    BACKBONES.register(_name, _vit(_name))


def build_backbone(cfg: Any, image_size: int) -> nn.Module:
    """The backbone ``cfg.backbone`` (a ``model.*`` section) names, for ``image_size`` px images.

    A registered backbone is a callable ``(model settings, image_size) -> nn.Module`` whose module
    has a ``feature_dim`` attribute."""
    return BACKBONES.get(cfg.backbone)(cfg, image_size)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ResNetBackbone", "ViTBackbone", "build_backbone", "count_parameters"]


def __getattr__(name: str) -> Any:
    # The torchvision-based classes load on first access (PEP 562), not with this module.
    if name == "ResNetBackbone":
        from .resnet import ResNetBackbone
        return ResNetBackbone
    if name == "ViTBackbone":
        from .vit import ViTBackbone
        return ViTBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
