"""Helpers that take lightly's own objects and give :class:`~nocollapse.CollapseMonitor` (and
decoupled prototypes) what they need.

lightly keeps some of what the monitor reads inside its modules: ``DINOLoss`` moves its centre
when it is called, so the teacher probabilities must be read before the loss; ``SwaVLoss``
computes its Sinkhorn codes internally; ``DINOProjectionHead`` returns only the prototype scores,
not the bottleneck embedding the mixture is fed. Needs the optional extra: ``pip install
'nocollapse[lightly]'`` (tested with lightly 1.6)::

    from nocollapse.integrations.lightly import DINOHeadWithBottleneck, dino_teacher_probabilities

    head = DINOHeadWithBottleneck(DINOProjectionHead(512, 2048, 256, 4096))
    scores, bottleneck = head(features)                     # the bottleneck is L2-normalised
    probs = dino_teacher_probabilities(criterion, teacher_scores[0], epoch=epoch)   # before the loss
    loss = criterion(teacher_scores, student_scores, epoch=epoch)
    monitor.update(step, probs=probs, embeddings=bottleneck_teacher, loss=loss)
    monitor.end_epoch(prototypes=head.prototypes)

Every function here reads lightly's modules and never changes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DINOHeadWithBottleneck",
    "last_layer_directions",
    "dino_teacher_temperature",
    "dino_teacher_probabilities",
    "swav_codes",
    "swav_prototype_vectors",
]


def dino_teacher_temperature(criterion: Any, epoch: int | None = None, teacher_temp: float | None = None) -> float:
    """The teacher temperature ``DINOLoss(..., epoch=epoch, teacher_temp=teacher_temp)`` uses: an
    explicit ``teacher_temp`` first, then the warm-up schedule by ``epoch``, then the final one."""
    if teacher_temp is not None:
        return float(teacher_temp)
    if epoch is not None and epoch < criterion.warmup_teacher_temp_epochs:
        return float(criterion.teacher_temp_schedule[epoch])
    return float(criterion.teacher_temp)


@torch.no_grad()
def dino_teacher_probabilities(criterion: Any, teacher_out: torch.Tensor | list[torch.Tensor],
                               epoch: int | None = None, teacher_temp: float | None = None) -> torch.Tensor:
    """The teacher's target distribution inside lightly's ``DINOLoss``:
    ``softmax((t - center) / tau_t)`` of one view ``[B, K]`` (or each of a list of views, joined
    view-major). Call it *before* the loss: ``DINOLoss`` updates its centre from the teacher
    output at the end of its ``forward``, and the probabilities after that are not the ones the
    student was trained towards."""
    t = torch.cat(list(teacher_out)) if isinstance(teacher_out, (list, tuple)) else teacher_out
    center = criterion.center
    if t.dim() != 2 or t.shape[-1] != center.shape[-1]:
        raise ValueError(f"teacher_out must be [B, {center.shape[-1]}] (the loss's output_dim), got "
                         f"{tuple(t.shape)}")
    temperature = dino_teacher_temperature(criterion, epoch, teacher_temp)
    return F.softmax((t.detach().float() - center.reshape(1, -1).float()) / temperature, dim=-1)


class DINOHeadWithBottleneck(nn.Module):
    """A lightly ``DINOProjectionHead`` that also returns its L2-normalised bottleneck.

    ``forward(x)`` gives ``(scores, bottleneck)`` with ``scores`` what the head itself returns
    (its weight-normalised last layer on the normalised bottleneck), so the monitor and a mixture
    get the embedding without a second forward. ``prototypes``: a
    :class:`~nocollapse.prototypes.base.PrototypeSet` (for example ``DecoupledPrototypes``) that
    replaces the head's last layer; the head's own last layer is then removed. Without it,
    :attr:`prototypes` is the head's last-layer weight as ``[K, D]`` unit rows, for
    ``CollapseMonitor.end_epoch(prototypes=...)``.
    """

    def __init__(self, head: nn.Module, prototypes: nn.Module | None = None) -> None:
        super().__init__()
        if not hasattr(head, "layers"):
            raise TypeError(f"expected a lightly DINOProjectionHead (with .layers), got {type(head).__name__}")
        self.head = head
        self.decoupled = prototypes
        if prototypes is not None and hasattr(head, "last_layer"):
            del head.last_layer

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The head's MLP output, L2-normalised: the embedding its prototypes score."""
        return F.normalize(self.head.layers(x), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, K], bottleneck [B, D])``: the prototype scores and the normalised
        embedding they were computed from."""
        z = self.bottleneck(x)
        scores = self.decoupled(z) if self.decoupled is not None else self.head.last_layer(z)
        return scores, z

    @property
    def prototypes(self) -> Any:
        """The prototype set given at construction, or the last layer's directions ``[K, D]``."""
        if self.decoupled is not None:
            return self.decoupled
        return last_layer_directions(self.head.last_layer)


def last_layer_directions(layer: nn.Module) -> torch.Tensor:
    """The rows of a (possibly weight-normalised) linear layer as unit vectors ``[K, D]``: the
    prototypes of a DINO head. Reads ``weight_v`` / the parametrization's original when present,
    so no forward is needed to refresh ``weight``."""
    parametrizations = getattr(layer, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        weight = parametrizations.weight.original1
    else:
        weight = getattr(layer, "weight_v", None)
        weight = layer.weight if weight is None else weight
    return F.normalize(weight.detach(), dim=1)


def swav_prototype_vectors(prototypes: nn.Module) -> torch.Tensor | list[torch.Tensor]:
    """The prototypes of a lightly ``SwaVPrototypes`` as ``[K, D]`` unit rows (a list for a
    multi-head module)."""
    rows = [F.normalize(layer.weight.detach(), dim=1) for layer in prototypes.heads]
    return rows[0] if len(rows) == 1 else rows


@torch.no_grad()
def swav_codes(criterion: Any, scores: torch.Tensor, queue_scores: torch.Tensor | None = None) -> torch.Tensor:
    """The Sinkhorn-Knopp codes ``[B, K]`` lightly's ``SwaVLoss`` computes for one
    high-resolution crop's ``scores`` (with the same iterations, epsilon and distributed
    gathering; ``queue_scores`` appended before and dropped after, as the loss does). They are the
    targets the other crops are trained towards: give them to the monitor as ``probs``."""
    from lightly.loss.swav_loss import sinkhorn

    outputs = scores.detach()
    if queue_scores is not None:
        outputs = torch.cat([outputs, queue_scores.detach()])
    codes = sinkhorn(outputs, iterations=criterion.sinkhorn_iterations, epsilon=criterion.sinkhorn_epsilon,
                     gather_distributed=criterion.sinkhorn_gather_distributed)
    return codes[: scores.shape[0]]
