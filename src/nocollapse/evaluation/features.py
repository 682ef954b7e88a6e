"""Frozen-feature extraction: the network in eval mode, no gradients, batched, split in order."""

from __future__ import annotations

import torch
from torch import nn

from ..data.loader import eval_batches
from ..data.sources import ImageSource


@torch.no_grad()
def extract_features(model: nn.Module, source: ImageSource, size: int, mean, std,
                     batch_size: int = 512, device: torch.device | str = "cpu",
                     num_workers: int = 0, max_samples: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, F]`` (float32, on CPU) and labels ``[N]`` of a whole split.

    ``model`` maps normalised images to features (a backbone) or to a tuple whose first element
    is the features. Norm layers run in eval mode (running statistics); the previous train/eval
    mode is restored afterwards. ``max_samples > 0`` keeps an evenly spaced subset.
    """
    device = torch.device(device)
    if max_samples and len(source) > max_samples:
        idx = torch.linspace(0, len(source) - 1, max_samples).round().long()
        source = source.subset(idx)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in eval_batches(source, size, mean, std, batch_size, device, num_workers):
            out = model(images)
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)
