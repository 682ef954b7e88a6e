"""The batch a training step receives."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


@dataclass
class Batch:
    """One process's share of a global batch, on the training device.

    * ``crops``: the augmented views, global crops first (each ``[B, 3, H, W]``);
    * ``labels``: ``[B]`` class indices, ``-1`` for a sample whose label is unknown or must not be
      used (an unlabelled split, a substituted unreadable image); ``None`` when the method does
      not use labels (the engine withholds them);
    * ``indices``: ``[B]`` indices into the training split of the images the crops were made from.
    """

    crops: list[torch.Tensor]
    labels: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    @classmethod
    def of(cls, data: "Batch | Sequence[torch.Tensor]") -> "Batch":
        """A batch, or a plain list of crops as a batch without labels or indices."""
        return data if isinstance(data, Batch) else cls(list(data))

    @property
    def size(self) -> int:
        return int(self.crops[0].shape[0])

    def without_labels(self) -> "Batch":
        return replace(self, labels=None)

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch([c.to(device, non_blocking=True) for c in self.crops], move(self.labels), move(self.indices))
