"""Self-supervised methods: one file per method on the template of ``base.py``.

Each method file registers its class in :data:`nocollapse.utils.registry.METHODS`; importing
this package registers the built-in ones (one line per method below). A method defined
elsewhere registers the same way, or through the ``nocollapse.methods`` entry-point group.
"""

from __future__ import annotations

from torch import nn

from ..config import Config
from ..data.loader import steps_per_epoch
from ..data.registry import DatasetSplits
from ..models.backbones import build_backbone
from ..utils.registry import METHODS
from . import dino, carp, swav, cplearn, simclr, supcon, clop, barlow_twins, vicreg, byol, simsiam  # noqa: F401,I001  (registers the built-in methods, the default first)
from .base import Encoder, SSLMethod, StepOutput, build_encoder, ema_update, frozen_copy
from .prototype_method import PrototypeMethod


def build_method(cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> SSLMethod:
    """The method ``cfg.method.name`` names, built around ``backbone``."""
    return METHODS.get(cfg.method.name)(cfg, backbone, steps_per_epoch)


def build_run_method(cfg: Config, splits: DatasetSplits, image_size: int, world_size: int = 1) -> SSLMethod:
    """The method of a run on ``splits``: the one factory of the trainer and of
    :func:`nocollapse.runs.load_run`, so that a re-opened run is the model that was trained.

    It resolves the dataset-dependent settings in ``cfg`` (``configure_for_data``), builds the
    backbone for ``image_size`` px crops, and cuts the method's per-step schedules (teacher
    momentum and temperature, warm-ups, ...) into the training loop's
    :func:`~nocollapse.data.loader.steps_per_epoch` for ``world_size`` processes; a re-opened run
    passes the world size its checkpoint was written with."""
    METHODS.get(cfg.method.name).configure_for_data(cfg, splits.num_classes)
    steps = steps_per_epoch(len(splits.ssl_train), cfg.train.batch_size, world_size)
    return build_method(cfg, build_backbone(cfg.model, image_size), steps)


__all__ = ["METHODS", "Encoder", "PrototypeMethod", "SSLMethod", "StepOutput", "build_encoder",
           "build_method", "build_run_method", "ema_update", "frozen_copy"]
