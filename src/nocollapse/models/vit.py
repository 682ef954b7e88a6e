"""Small vision transformers on torchvision's VisionTransformer.

Kept apart from :mod:`nocollapse.models.backbones` because importing torchvision is slow: the
registry builds these only when a config asks for a ViT, so registering the built-in backbones does
not load torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# variant -> (hidden_dim, depth, heads); MLP width is 4 x hidden_dim.
VITS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}


class ViTBackbone(VisionTransformer):
    """torchvision's VisionTransformer returning the class token, for any input size.

    Positional embeddings are bicubically interpolated to the patch grid of the input, so the
    same network embeds DINO's global and (smaller) local crops.
    """

    def __init__(self, variant: str, image_size: int, patch_size: int) -> None:
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the ViT patch size {patch_size}")
        hidden, depth, heads = VITS[variant]
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


__all__ = ["VITS", "ViTBackbone"]
