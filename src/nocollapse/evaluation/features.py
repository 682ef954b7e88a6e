"""Frozen-feature extraction: the network in eval mode, no gradients, batched, split in order."""

from __future__ import annotations

import torch
from torch import nn

from ..data.loader import eval_batches
from ..data.sources import ImageSource


@torch.no_grad()
def extract_outputs(model: nn.Module, source: ImageSource, size: int, mean, std,
                    batch_size: int = 512, device: torch.device | str = "cpu",
                    num_workers: int = 0, max_samples: int = 0,
                    bad_images: str = "skip") -> tuple[list[torch.Tensor], torch.Tensor]:
    """All outputs of ``model`` on a whole split: a list with one ``[N, *]`` float32 CPU tensor
    per output (a model may return one tensor or a tuple) and the labels ``[N]``.

    Norm layers run in eval mode (running statistics); the previous train/eval mode is restored
    afterwards. ``max_samples > 0`` keeps an evenly spaced subset of the split.
    """
    device = torch.device(device)
    if max_samples and len(source) > max_samples:
        idx = torch.linspace(0, len(source) - 1, max_samples).round().long()
        source = source.subset(idx)
    was_training = model.training
    model.eval()
    outputs: list[list[torch.Tensor]] = []
    labels = []
    try:
        for images, y in eval_batches(source, size, mean, std, batch_size, device, num_workers, bad_images):
            out = model(images)
            out = out if isinstance(out, (tuple, list)) else (out,)
            if not outputs:
                outputs = [[] for _ in out]
            for store, tensor in zip(outputs, out):
                store.append(tensor.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return [torch.cat(parts) for parts in outputs], torch.cat(labels)


def extract_features(model: nn.Module, source: ImageSource, size: int, mean, std,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, F]`` (the model's first output) and labels ``[N]`` of a whole split."""
    outputs, labels = extract_outputs(model, source, size, mean, std, **kwargs)
    return outputs[0], labels
