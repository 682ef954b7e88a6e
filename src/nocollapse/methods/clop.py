"""CLOP (Li, Nguyen & Pimentel-Alarcon, arXiv 2403.18699): a contrastive loss plus a term that pulls
the projections of labelled samples onto fixed orthonormal class prototypes (``losses/clop.py``).

    L = L_base(z1, z2) + clop.weight * L_CLOP(z1, z2, labels, prototypes)

``clop.base`` is ``supcon`` (default: ``clop`` against ``supcon`` then isolates the prototype
term) or ``nt_xent`` (SimCLR + CLOP). The authors' public code never feeds labels to NT-Xent +
CLOP, so the semi-supervised SimCLR + CLOP here (NT-Xent on every sample, the prototype term on
the labelled subset of ``data.label_fraction``) is built from the paper's description.

The C prototypes (C = ``clop.num_classes``, resolved from the dataset when not set) are a buffer
saved with the model, drawn from ``clop.prototype_seed`` so that they are the same on every
process, and never trained; ``contrastive.output_dim`` must be at least C. They are the method's
prototypes for the reports (fixed and orthonormal by construction, so only their use is measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import Config, ConfigError, choice, setting
from ..data.batch import Batch
from ..losses.clop import DISTANCES, clop_loss
from ..losses.contrastive import nt_xent
from ..prototypes.fixed import FixedPrototypes, orthonormal_prototypes
from ..utils.registry import METHODS
from .supcon import SupCon


@dataclass
class ClopSettings:
    weight: float = setting(1.0, "lambda, the weight of the prototype term (not divided by the processes)", 0.0)
    base: str = choice("supcon", ("supcon", "nt_xent"), "the contrastive loss the prototype term is added to")
    distance: str = choice("cosine", DISTANCES, "1 - cosine to the class prototype, or the unsquared "
                           "Euclidean distance of the normalised projection")
    num_classes: Optional[int] = setting(None, "C, the number of class prototypes (default: the dataset's "
                                         "number of classes)", 1)
    prototype_seed: int = setting(0, "seed of the orthonormal prototypes (independent of train.seed)")

    def validate(self, cfg: Config) -> None:
        if self.num_classes is not None and cfg.contrastive.output_dim < self.num_classes:
            raise ConfigError(f"clop needs contrastive.output_dim >= clop.num_classes "
                              f"({cfg.contrastive.output_dim} < {self.num_classes})")


@METHODS.register("clop")
class CLOP(SupCon):
    name = "clop"

    @classmethod
    def settings(cls) -> dict[str, type]:
        return {**super().settings(), "clop": ClopSettings}

    @classmethod
    def configure_for_data(cls, cfg: Config, num_classes: int) -> None:
        if cfg.clop.num_classes is None:
            cfg.clop.num_classes = num_classes
            ClopSettings.validate(cfg.clop, cfg)
        elif cfg.clop.num_classes < num_classes:
            raise ConfigError(f"clop.num_classes={cfg.clop.num_classes} but the dataset has {num_classes} classes")

    def __init__(self, cfg: Config, backbone: nn.Module, steps_per_epoch: int) -> None:
        super().__init__(cfg, backbone, steps_per_epoch)
        s = cfg.clop
        if s.num_classes is None:
            raise ConfigError("clop.num_classes is not set: it is resolved from the dataset by the trainer, "
                              "or set it yourself")
        # cosine scores of the projections against the class prototypes (what the reports read)
        self.prototypes = FixedPrototypes(orthonormal_prototypes(s.num_classes, cfg.contrastive.output_dim,
                                                                 s.prototype_seed), normalize_inputs=True)

    def saved_state_names(self) -> dict[str, tuple[str, bool]]:
        return {"prototypes.rows": ("prototypes", False)}

    def contrastive_loss(self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.cfg.clop.base == "nt_xent":
            return nt_xent(z1, z2, self.temperature)
        return super().contrastive_loss(z1, z2, batch)

    def extra_loss(self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch, logs: dict) -> torch.Tensor:
        term = clop_loss(z1, z2, batch.labels, self.prototypes.vectors(), self.cfg.clop.distance)
        logs["loss_clop"] = float(term.detach())
        return self.cfg.clop.weight * term

    # ---- the prototypes in the reports -----------------------------------------------------
    def probs_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores / self.temperature, dim=-1)

    def summary_fields(self) -> dict:
        s = self.cfg.clop
        return {**super().summary_fields(), "num_prototypes": self.num_prototypes, "clop_weight": s.weight,
                "clop_base": s.base, "clop_distance": s.distance}
