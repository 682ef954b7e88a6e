"""Self-supervised methods: one file per method on the template of ``base.py``.

Each method file registers its class in :data:`nocollapse.utils.registry.METHODS`; importing
this package registers the built-in ones (one line per method below). A method defined
elsewhere registers the same way, or through the ``nocollapse.methods`` entry-point group.
"""

from __future__ import annotations

from torch import nn

from ..config import Config
from ..utils.registry import METHODS
from . import dino, carp, swav, cplearn, simclr, supcon, clop, barlow_twins, vicreg, byol, simsiam  # noqa: F401,I001  (registers the built-in methods, the default first)
from .base import Encoder, SSLMethod, StepOutput, build_encoder, ema_update, frozen_copy
from .prototype_method import PrototypeMethod


def build_method(cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> SSLMethod:
    """The method ``cfg.method.name`` names, built around ``backbone``."""
    return METHODS.get(cfg.method.name)(cfg, backbone, steps_per_epoch)


__all__ = ["METHODS", "Encoder", "PrototypeMethod", "SSLMethod", "StepOutput", "build_encoder",
           "build_method", "ema_update", "frozen_copy"]
