"""One interface for the K prototype vectors of any method: learned, decoupled or fixed.

A :class:`PrototypeSet` is an ``nn.Module`` that a method (or a user's own head) owns. It scores
embeddings against its K prototypes and takes part in the step through a few hooks; everything
that reads prototypes (the methods' hooks, the monitor, the report, the Lightning callback)
reads this one object:

======================================  =====================================================
``forward(z)``                          scores ``[N, K]`` of the trained network's embeddings
                                        (gradient reaches learned prototypes only)
``target_scores(z)``                    scores against the prototypes targets come from (an EMA
                                        teacher's copy for learned prototypes with a teacher)
``vectors()``                           the prototypes as rows ``[K, D]``, detached
``trainable_vectors()``                 the rows with their gradient (learned only; KoLeo)
``usage_weights()`` / ``idle_mask()``   the set's own usage record, if it keeps one
``snapshot()``                          the placed prototypes with their usage, for reports
``update(embeddings, step, views)``     propose this step's change from the detached
                                        (teacher) embeddings; responsibilities or None
``after_backward(step)``                e.g. cancel the gradient of prototypes still frozen
``after_optimizer_step(step, m)``       commit the proposal, EMA-update or renormalise
``discard()``                           drop the proposal of a step whose loss was not finite
``step_logs()``                         scalars for the step's metrics
======================================  =====================================================

Implementations: :class:`~nocollapse.prototypes.learned.LearnedPrototypes` (a trainable last
layer, optionally with an EMA teacher copy), :class:`~nocollapse.prototypes.decoupled.DecoupledPrototypes`
(the means of an online-EM mixture, no gradient) and
:class:`~nocollapse.prototypes.fixed.FixedPrototypes` (a buffer that never changes: CPLearn's
codebook, CLOP's class prototypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PrototypeSnapshot:
    """The placed prototypes of a set, as the reports read them (CPU, fp32, detached).

    ``vectors`` ``[K', D]``; ``usage_weights`` and ``idle`` ``[K']`` or None; ``fixed``: distinct
    by construction, so their uniqueness is not measured. ``K'`` is below K only for a mixture
    whose components are not all seeded yet."""

    vectors: torch.Tensor
    usage_weights: torch.Tensor | None = None
    idle: torch.Tensor | None = None
    fixed: bool = False


class PrototypeSet(nn.Module):
    """Base class of the three kinds of prototypes (see the module doc). Subclasses set ``dim``,
    implement :meth:`forward`, :meth:`vectors` and :attr:`num_prototypes`, and override the
    hooks that apply to them; the defaults are those of prototypes that never change."""

    #: ``"learned"``, ``"decoupled"`` or ``"fixed"``
    kind = "base"
    #: distinct by construction (a random codebook, orthonormal class prototypes)
    fixed = False
    dim: int

    @property
    def num_prototypes(self) -> int:  # pragma: no cover - every subclass overrides it
        """K, the number of prototypes."""
        raise NotImplementedError

    def vectors(self) -> torch.Tensor:  # pragma: no cover
        """The prototypes as rows ``[K, D]``, detached (those targets are scored against)."""
        raise NotImplementedError

    def target_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Scores of ``z`` against the prototypes the targets come from (no gradient to them)."""
        with torch.no_grad():
            return self(z)

    def product_factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(inputs [N, D], rows [K, D])`` with ``self(z) == inputs @ rows^T`` and the gradient of
        ``self(z)`` flowing through both, for sets whose scores are one product: a loss can then
        make the scores itself and never hold their whole gradient. None for other sets."""
        return None

    def ordered_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``self(z)`` with its columns taken in the order ``order`` (``[K]`` prototype indices):
        column ``i`` is the score against prototype ``order[i]``. Sets that score by a product
        override it to take the K rows of the prototypes in that order before the product, so
        that the ``[N, K]`` scores are made in that order instead of gathered afterwards."""
        return self(z).index_select(1, order)

    def ordered_target_scores(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """:meth:`target_scores` with its columns taken in the order ``order`` (as
        :meth:`ordered_scores`)."""
        with torch.no_grad():
            return self.target_scores(z).index_select(1, order)

    def trainable_vectors(self) -> torch.Tensor | None:
        """The trained rows ``[K, D]`` with their gradient (learned prototypes; None otherwise)."""
        return None

    def usage_weights(self) -> torch.Tensor | None:
        """``[K]`` weights of each prototype by its recent assignment mass (a mixture's ``pi``),
        or None when the set keeps no such record."""
        return None

    def idle_mask(self) -> torch.Tensor | None:
        """Boolean ``[K]``: prototypes that recently received (almost) no assignment mass."""
        return None

    def snapshot(self) -> PrototypeSnapshot:
        """The placed prototypes with their usage record, on the CPU, for reports and the monitor."""
        weights, idle = self.usage_weights(), self.idle_mask()
        return PrototypeSnapshot(self.vectors().detach().float().cpu(),
                                 None if weights is None else weights.detach().float().cpu(),
                                 None if idle is None else idle.detach().cpu(), self.fixed)

    def update(self, embeddings: torch.Tensor, step: int, views: int = 1) -> torch.Tensor | None:
        """Propose this step's change from detached embeddings ``[views * B, D]``; the
        responsibilities ``[views * B, K]`` when the set computes them, None otherwise."""
        return None

    def after_backward(self, step: int) -> None:
        """Called after the backward pass of ``step`` (e.g. drop the gradient of frozen prototypes)."""
        return None

    def after_optimizer_step(self, step: int, teacher_momentum: float | None = None) -> None:
        """Called after the optimiser step of ``step``: commit the proposal, EMA-update the teacher
        copy with ``teacher_momentum``, or renormalise."""
        return None

    def commit(self) -> None:
        """Write the change :meth:`update` proposed (nothing for sets that propose none)."""
        return None

    def discard(self) -> None:
        """Drop the proposal of a step whose loss was not finite."""
        return None

    def step_logs(self) -> dict[str, float]:
        """Scalars of the set for the step's metrics."""
        return {}
