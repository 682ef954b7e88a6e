"""SupCon (Khosla et al. 2020): SimCLR's network with the supervised contrastive loss (L_out form,
``losses/contrastive.py``), semi-supervised: samples of the labelled subset (``data.label_fraction``)
attract every view of their class, the others only their own other view."""

from __future__ import annotations

import torch

from ..data.batch import Batch
from ..losses.contrastive import supcon
from ..utils.registry import METHODS
from .simclr import SimCLR


@METHODS.register("supcon")
class SupCon(SimCLR):
    name = "supcon"
    uses_labels = True

    def contrastive_loss(self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch) -> torch.Tensor:
        return supcon(z1, z2, batch.labels, self.temperature)
