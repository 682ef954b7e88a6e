"""Backbones: torchvision ResNets with a width multiplier and a CIFAR stem, and small ViTs.

Every backbone maps images ``[B, 3, H, W]`` to pooled features ``[B, feature_dim]`` and exposes
``feature_dim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from ..utils.registry import BACKBONES

_RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

# (hidden_dim, depth, heads); MLP width is 4 x hidden_dim.
_VITS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}


class ResNetBackbone(ResNet):
    """torchvision's ResNet with every stage's width scaled by ``width_multiplier``.

    ``cifar_stem`` replaces the 7x7 stride-2 convolution and max-pool by one 3x3 stride-1
    convolution, the usual choice for 32 px images. The classifier is removed. ``channels_last``
    stores weights and inputs in NHWC order, which oneDNN / cuDNN convolutions usually run faster
    (the measured speed-up is in docs/results.md, "Notes moved from the recipe files"). It is
    not applied when the narrowest stage has fewer than ``MIN_CHANNELS_LAST_WIDTH`` channels:
    there oneDNN's NHWC weight-gradient kernel writes outside its buffers on AVX2 CPUs with one
    thread (torch 2.14: heap corruption, then a crash), and such narrow layers gain nothing
    from the format anyway.
    """

    MIN_CHANNELS_LAST_WIDTH = 8

    def __init__(self, depth: str, width_multiplier: float = 1.0, cifar_stem: bool = False,
                 channels_last: bool = False) -> None:
        block, layers = _RESNETS[depth]
        nn.Module.__init__(self)
        widths = [max(1, round(c * width_multiplier)) for c in (64, 128, 256, 512)]
        # Attributes torchvision's ResNet._make_layer reads.
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = widths[3] * block.expansion
        self.channels_last = channels_last and widths[0] >= self.MIN_CHANNELS_LAST_WIDTH
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ViTBackbone(VisionTransformer):
    """torchvision's VisionTransformer returning the class token, for any input size.

    Positional embeddings are bicubically interpolated to the patch grid of the input, so the
    same network embeds DINO's global and (smaller) local crops.
    """

    def __init__(self, variant: str, image_size: int, patch_size: int) -> None:
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the ViT patch size {patch_size}")
        hidden, depth, heads = _VITS[variant]
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=depth,
                         num_heads=heads, hidden_dim=hidden, mlp_dim=4 * hidden)
        self.heads = nn.Identity()
        self.feature_dim = hidden

    def _positional(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        base = self.image_size // self.patch_size
        if grid_h == base and grid_w == base:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, base, base, -1).permute(0, 3, 1, 2)
        patch_pos = nn.functional.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                              align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the ViT patch size {p}")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self._positional(h // p, w // p)
        tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))
        return tokens[:, 0]


def _resnet(depth: str):
    def build(cfg: Any, image_size: int) -> nn.Module:
        cifar = cfg.stem == "cifar" or (cfg.stem == "auto" and image_size < 96)
        return ResNetBackbone(depth, cfg.width_multiplier, cifar_stem=cifar, channels_last=cfg.channels_last)
    return build


def _vit(name: str):
    def build(cfg: Any, image_size: int) -> nn.Module:
        return ViTBackbone(name, image_size, cfg.patch_size)
    return build


for _name in _RESNETS:
    BACKBONES.register(_name, _resnet(_name), default=_name == "resnet18")
for _name in _VITS:
    BACKBONES.register(_name, _vit(_name))


def build_backbone(cfg: Any, image_size: int) -> nn.Module:
    """The backbone ``cfg.backbone`` (a ``model.*`` section) names, for ``image_size`` px images.

    A registered backbone is a callable ``(model settings, image_size) -> nn.Module`` whose module
    has a ``feature_dim`` attribute."""
    return BACKBONES.get(cfg.backbone)(cfg, image_size)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ResNetBackbone", "ViTBackbone", "build_backbone", "count_parameters"]
