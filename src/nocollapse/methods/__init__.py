"""Self-supervised methods: one file per method on the thin template of ``base.py``."""

from __future__ import annotations

from torch import nn

from ..config import Config
from .base import SSLMethod, StepOutput
from .carp import CARP
from .dino import DINO

METHODS: dict[str, type[SSLMethod]] = {
    "dino": DINO,
    "carp": CARP,
}


def build_method(cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> SSLMethod:
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg, backbone, steps_per_epoch)


__all__ = ["METHODS", "SSLMethod", "StepOutput", "build_method"]
