"""ResNet backbones on torchvision's ResNet, with a width multiplier and a CIFAR stem.

Kept apart from :mod:`nocollapse.models.backbones` because importing torchvision is slow: the
registry builds these only when a config asks for a ResNet, so registering the built-in backbones
does not load torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# depth name -> (residual block, blocks per stage)
RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
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
        block, layers = RESNETS[depth]
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


__all__ = ["RESNETS", "ResNetBackbone"]
