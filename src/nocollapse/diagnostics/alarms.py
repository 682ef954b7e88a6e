"""Collapse alarms: watch logged metrics and say, once, when a run has collapsed.

Feed :meth:`AlarmMonitor.update` the metrics dict of a training step (the keys
produced by :func:`~nocollapse.diagnostics.assignments.assignment_stats`,
:func:`~nocollapse.diagnostics.embeddings.embedding_std` and friends, plus ``loss``).
Each alarm needs its condition to hold for ``patience`` consecutive updates after
``warmup_steps`` (at initialisation the outputs of a DINO head are nearly uniform,
so the loss starts at ln K). An alarm fires at most once per monitor; the state
(fired alarms and running counters) is saved by :meth:`AlarmMonitor.state_dict`.
A metric that is missing from an update skips that check and leaves its counter
unchanged.

Every alarm is one declared :class:`AlarmRule` in :data:`ALARM_RULES` (name, tier, check, cause,
remedy), in one of three tiers (:data:`TIERS`): **collapse** alarms say training is failing
(``uniform_collapse``, ``one_hot_collapse``, ``representation_collapse``,
``dimensional_collapse``); **warnings** report wasted capacity, which a run that learns well may
have (``unused_prototypes``, ``prototype_collapse``), are printed as ``WARNING`` and can be
silenced (``CollapseMonitor(warnings=False)``, ``diagnostics.warnings=false``); ``skipped_steps``
is a fault of the run, not a collapse.

Two checks are relative to the run's own history: the monitor keeps the highest
``embedding_std`` and ``direction_rank`` it has seen (saved with its state), so that a head whose
embeddings start in a narrow cone, or span few directions at initialisation, is judged by what it
reached, not by a constant. The two histories start at different times:

- ``direction_rank`` from the first update, warm-up included, so that a run that collapses
  inside the warm-up (before any alarm is checked) is still judged against the rank it had. Its
  threshold (``dimensional_fraction``, a fall to a twentieth) leaves room for the rank a random
  initialisation shows and training does not keep.
- ``embedding_std`` from the end of the warm-up: in the first steps a randomly initialised
  head's batch statistics (batch norm on a training batch) spread the embeddings in a way that
  training does not keep, and the representation check's fall to one half of the peak is too
  close to that spread.

Every count is judged against what the batch can show, ``min(K, N)``.

**Held-out embeddings.** A training batch goes through the network in training mode: batch norm
re-centres and re-scales it with its own statistics, which can spread a collapsed batch again
(VICReg without its variance term: a batch cosine of 0.6-0.94 while held-out images in eval mode
sit at 0.98-1.0). When an update also carries the ``held_out_`` metrics (``held_out_mean_cosine``,
``held_out_embedding_std``, ``held_out_direction_rank``: the same measures on a fixed set of images
encoded in eval mode, which :class:`~nocollapse.diagnostics.monitor.CollapseMonitor` computes
from its ``held_out`` function), the representation and dimensional checks count a check as
failing when either view shows the collapse. Each held-out metric keeps its own history, started
as its batch counterpart's.

Alarms and the metric keys they read:

``uniform_collapse``
    With assignments (``mean_entropy``): ``mean_entropy >= (1 - uniform_entropy_tol) ln K``,
    every sample spread uniformly over the prototypes, and not falling: a check at which the
    entropy is more than ``uniform_falling_tol * ln K`` below the previous check's does not
    count. A head that starts uniform and sharpens (CARP's first tens of steps) is learning; a
    uniform collapse stays at ln K or climbs to it. Without assignments, the loss:
    ``|loss - ln K| < uniform_rel_tol * ln K`` (``K`` from the constructor or the
    ``num_prototypes`` key; override the reference with ``uniform_loss_reference``, e.g.
    ``ln 512`` for CARP whose block softmax has 512 entries). The loss alone cannot tell the
    plateau at ln K of a DINO head that has not started to learn (sharp teacher targets, a
    student still uniform) from uniform assignments, so the assignments decide when they are
    reported.
``one_hot_collapse``
    The batch's samples fall on at most ``max(2, one_hot_max_effective_fraction * min(K, N))``
    prototypes (``argmax_used`` when reported, else fewer than that many
    ``effective_prototypes``; ``N`` from ``num_samples``) while each sample sits mostly on one
    (``max_prob > one_hot_threshold``, which keeps uniform assignments, whose arg-max is a tie,
    out of this alarm). A batch of N samples spreads over at most N prototypes, so sharp but
    diverse assignments of a batch much smaller than K are healthy. The fraction (default 3 %) is
    larger than the 1 % a held-out set of several hundred images is judged by, because a
    training batch of about a hundred samples from the same collapsed run shows as many of the
    few prototypes as the larger set does, not a third as many.
``representation_collapse``
    Every embedding points the same way: ``mean_cosine > representation_cosine`` (mean pairwise
    cosine of the batch) while ``embedding_std`` has fallen below
    ``representation_spread_fraction`` of its highest value so far; or, whatever the history,
    ``embedding_std < representation_fraction / sqrt(D)`` (``D`` from the constructor or the
    ``embedding_dim`` key; healthy values are about ``1/sqrt(D)``); or, on the held-out images,
    ``held_out_mean_cosine > held_out_cosine`` while ``held_out_embedding_std`` has fallen below
    ``representation_spread_fraction`` of its highest value so far. The held-out cosine limit is
    higher (0.97 against 0.92) because a DINO head's held-out embeddings of a run that learns can
    sit in a cone of cosine 0.95 for a hundred steps.
``dimensional_collapse``
    The embeddings span few directions: ``direction_rank`` (RankMe of the batch's normalised,
    centred embeddings) below ``dimensional_fraction`` of its highest value so far, or
    ``held_out_direction_rank`` below the same fraction of its own highest value. A collapse
    that keeps every dimension's variance (Barlow Twins without its off-diagonal term, a
    projector ending in batch norm) shows here and nowhere else.
``unused_prototypes``
    Fewer than ``unused_fraction`` of the prototypes are used. The fraction used is
    ``argmax_used / min(K, N)`` (or ``prototype_utilization * K / min(K, N)``) when the
    number of samples ``N`` (``num_samples``) is known, so a batch smaller than K is not
    penalised; otherwise ``prototype_utilization`` as is (compute it over >= K samples).
``prototype_collapse``
    ``unique_<unique_eps>`` (fraction of unique prototypes at ε = ``unique_eps``, in
    [0, 1]) below ``unique_fraction_threshold``: partial prototype collapse. ε = 0.025
    is the paper's strict reading (prototypes must coincide almost exactly); a merge
    shows much earlier at ε = 0.1 (cosine similarity above 0.9, at which two prototypes
    take the same images), so training watches that by default (the run that motivates it:
    docs/results.md, section 4).
``skipped_steps``
    Not a collapse: more than ``skipped_fraction`` of the optimisation steps so far
    (``steps``) were skipped (``skipped_steps``) because the loss was not finite
    (``train.nonfinite=skip``), so the model learned from a minority of its batches. The
    trainer feeds it at every log step after the warm-up and once more at the end of the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Alarm", "AlarmMonitor", "AlarmRule", "ALARM_NAMES", "ALARM_RULES", "COLLAPSE_ALARMS", "WARNINGS",
           "TIERS"]

#: ``collapse``: training is failing; ``warning``: capacity is wasted, training may be fine;
#: ``run``: not a collapse, a fault of the run (non-finite losses).
TIERS: tuple[str, ...] = ("collapse", "warning", "run")


@dataclass(frozen=True)
class AlarmRule:
    """One alarm or warning, declared once: its name, tier, the :class:`AlarmMonitor` method that
    checks it (returning ``None`` when its metrics are missing, ``(nan, "")`` when healthy, or
    ``(value, message)`` when the condition holds), and the likely cause and remedy it prints."""

    name: str
    tier: str
    check: str
    cause: str
    remedy: str


ALARM_RULES: tuple[AlarmRule, ...] = (
    AlarmRule(
        name="uniform_collapse", tier="collapse", check="_check_uniform",
        cause=(
            "every sample is assigned uniformly over the prototypes: the teacher temperature is "
            "too high, centering dominates the teacher output, the prototypes themselves have "
            "collapsed (all logits equal), or teacher and student are identical / not updated"
        ),
        remedy=(
            "lower the teacher temperature (e.g. 0.04) or shorten its warm-up, check the centre "
            "update, freeze the last layer for the first epoch, remove BatchNorm from the head, "
            "check that the teacher is an EMA of the student, or use decoupled prototypes"
        ),
    ),
    AlarmRule(
        name="one_hot_collapse", tier="collapse", check="_check_one_hot",
        cause=(
            "all samples go to the same prototype with probability ~1: sharpening without enough "
            "centering, a teacher temperature that is too low, or a centre momentum that is too "
            "slow"
        ),
        remedy=(
            "enable or strengthen centering (faster centre momentum), raise the teacher "
            "temperature, add a KL-to-uniform / entropy term or Sinkhorn-Knopp balancing"
        ),
    ),
    AlarmRule(
        name="representation_collapse", tier="collapse", check="_check_representation",
        cause=(
            "all embeddings point in the same direction: no effective negative / uniformity term, "
            "a missing stop-gradient or EMA teacher, or a learning rate that is too high"
        ),
        remedy=(
            "check the stop-gradient / EMA teacher, lower the learning rate, increase the weight "
            "of the variance / uniformity / entropy term, use a larger batch"
        ),
    ),
    AlarmRule(
        name="dimensional_collapse", tier="collapse", check="_check_dimensional",
        cause=(
            "the embeddings span only a few directions: no decorrelation term (Barlow Twins' "
            "off-diagonal, VICReg's covariance) or one too weak for the embedding width, a "
            "predictor or projector that learned a low-rank map, or a learning rate that is too high"
        ),
        remedy=(
            "check the decorrelation / covariance weight, widen the projector or lower the "
            "learning rate, add KoLeo on the embeddings, or use a larger batch"
        ),
    ),
    AlarmRule(
        name="unused_prototypes", tier="warning", check="_check_unused",
        cause=(
            "most prototypes are never the arg-max of any sample: partial prototype collapse or "
            "prototypes that drifted away from the data (dead prototypes)"
        ),
        remedy=(
            "use fewer prototypes, balance assignments (Sinkhorn-Knopp, KL to uniform), add KoLeo "
            "on prototypes, re-seed dead prototypes, or use decoupled prototypes"
        ),
    ),
    AlarmRule(
        name="prototype_collapse", tier="warning", check="_check_prototype_collapse",
        cause=(
            "many prototypes converged to nearly the same direction (partial prototype collapse), "
            "typical of prototypes learned jointly with the encoder"
        ),
        remedy=(
            "use decoupled (EM-updated) prototypes, a KoLeo-proto regulariser, or a fixed / "
            "orthogonal prototype set"
        ),
    ),
    AlarmRule(
        name="skipped_steps", tier="run", check="_check_skipped_steps",
        cause=(
            "the loss is NaN or infinite on most batches: a learning rate too high for this batch "
            "size, a temperature too low, fp16 overflow, or input that is not what the model "
            "expects"
        ),
        remedy=(
            "lower optim.lr or lengthen optim.warmup_epochs, check the temperatures, train in "
            "bf16 or fp32, lower optim.clip_grad; train.nonfinite=stop stops at the first such "
            "step and names it"
        ),
    ),
)

_RULES: dict[str, AlarmRule] = {rule.name: rule for rule in ALARM_RULES}
#: every alarm and warning name, in declaration order (the names ``stop_on`` and ``enabled`` take)
ALARM_NAMES: tuple[str, ...] = tuple(_RULES)
#: the alarms that say training is failing
COLLAPSE_ALARMS: tuple[str, ...] = tuple(r.name for r in ALARM_RULES if r.tier == "collapse")
#: the warnings: wasted capacity (unused prototypes, partial prototype collapse), not a failure
WARNINGS: tuple[str, ...] = tuple(r.name for r in ALARM_RULES if r.tier == "warning")


@dataclass(frozen=True)
class Alarm:
    """One fired alarm: what collapsed, when, how strongly, why and what to do."""

    name: str
    step: int
    value: float
    message: str
    cause: str
    remedy: str
    tier: str = "collapse"     # state dicts written before the tiers existed load as before

    def __str__(self) -> str:
        if self.tier == "warning":
            return (
                f"[nocollapse] WARNING {self.name} at step {self.step} (wasted capacity, not a "
                f"failure): {self.message}\n"
                f"  likely cause: {self.cause}\n"
                f"  remedy, if that capacity matters: {self.remedy}"
            )
        return (
            f"[nocollapse] ALARM {self.name} at step {self.step}: {self.message}\n"
            f"  likely cause: {self.cause}\n"
            f"  remedy: {self.remedy}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The alarm as a JSON-serialisable dict (name, step, value, message, ...)."""
        return asdict(self)


_HEALTHY: tuple[float, str] = (float("nan"), "")
#: metrics whose highest value so far the history-relative checks compare against, and whether
#: the warm-up's values count (see the module doc: the rank's do, the spread's do not)
_HISTORY_KEYS: dict[str, bool] = {"embedding_std": False, "direction_rank": True,
                                  "held_out_embedding_std": False, "held_out_direction_rank": True}
#: the prefix of the metrics measured on held-out images in eval mode (see the module doc)
HELD_OUT_PREFIX = "held_out_"


def _either(first: tuple[float, str] | None, second: tuple[float, str] | None) -> tuple[float, str] | None:
    """Combine two views of one check: failing when either fails, healthy when one is healthy and
    the other healthy or unmeasured, unmeasured (None) when neither is measured."""
    for result in (first, second):
        if result is not None and result[1]:
            return result
    if first is None and second is None:
        return None
    return _HEALTHY


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a finite float, or None when missing / not a finite number."""
    value = metrics.get(key)
    if value is None:
        return None
    try:
        if hasattr(value, "item"):
            value = value.item()
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


class AlarmMonitor:
    """Raise each collapse alarm once when its condition persists (see module doc).

    Args:
        num_prototypes: K; if None, taken from the ``num_prototypes`` metric.
        embedding_dim: D for the representation check; if None, from ``embedding_dim``.
        warmup_steps: updates with ``step < warmup_steps`` are not checked (their ``direction_rank``
            still counts towards its history peak).
        patience: consecutive checked updates the condition must hold.
        uniform_rel_tol: relative tolerance of the loss around ``ln K`` (default 0.5 %).
        uniform_entropy_tol: relative tolerance of the mean assignment entropy below ``ln K``.
        uniform_falling_tol: a drop of the mean entropy since the previous check larger than this
            fraction of ``ln K`` keeps ``uniform_collapse`` from counting the check.
        uniform_loss_reference: the loss of a uniform collapse if it is not ``ln K``.
        one_hot_threshold: ``max_prob`` above which samples count as sitting on one prototype.
        one_hot_max_effective_fraction: see module doc.
        representation_cosine: mean pairwise cosine above which embeddings share one direction.
        held_out_cosine: the same limit for the held-out images' embeddings.
        representation_spread_fraction: ... while ``embedding_std`` is below this fraction of
            its highest value so far.
        representation_fraction: alarm whatever the history when ``embedding_std < fraction /
            sqrt(D)``.
        dimensional_fraction: alarm when ``direction_rank`` is below this fraction of its
            highest value so far.
        unused_fraction: alarm when the fraction of prototypes used is below this.
        unique_fraction_threshold: alarm when ``unique_<unique_eps>`` is below this.
        unique_eps: the ε (a key of the unique-prototype metrics: "0.025", "0.1", "0.25"
            or "0.5") that ``prototype_collapse`` watches.
        skipped_fraction: ``skipped_steps`` fires when more than this fraction of the steps
            were skipped.
        enabled: names of the alarms to check (default all of :data:`ALARM_NAMES`).
    """

    def __init__(
        self,
        num_prototypes: int | None = None,
        embedding_dim: int | None = None,
        *,
        warmup_steps: int = 1000,
        patience: int = 3,
        uniform_rel_tol: float = 0.005,
        uniform_entropy_tol: float = 0.02,
        uniform_falling_tol: float = 1e-4,
        uniform_loss_reference: float | None = None,
        one_hot_threshold: float = 0.5,
        one_hot_max_effective_fraction: float = 0.03,
        representation_cosine: float = 0.92,
        held_out_cosine: float = 0.97,
        representation_spread_fraction: float = 0.5,
        representation_fraction: float = 0.1,
        dimensional_fraction: float = 0.05,
        unused_fraction: float = 0.5,
        unique_fraction_threshold: float = 0.5,
        unique_eps: str = "0.025",
        skipped_fraction: float = 0.5,
        enabled: tuple[str, ...] | list[str] | None = None,
    ) -> None:
        if num_prototypes is not None and num_prototypes < 2:
            raise ValueError(f"num_prototypes must be >= 2, got {num_prototypes}")
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        names = tuple(ALARM_NAMES if enabled is None else enabled)
        unknown = sorted(set(names) - set(ALARM_NAMES))
        if unknown:
            raise ValueError(f"unknown alarm names {unknown}; known: {list(ALARM_NAMES)}")
        self.num_prototypes = num_prototypes
        self.embedding_dim = embedding_dim
        self.warmup_steps = warmup_steps
        self.patience = patience
        self.uniform_rel_tol = uniform_rel_tol
        self.uniform_entropy_tol = uniform_entropy_tol
        self.uniform_falling_tol = uniform_falling_tol
        self.uniform_loss_reference = uniform_loss_reference
        self.one_hot_threshold = one_hot_threshold
        self.one_hot_max_effective_fraction = one_hot_max_effective_fraction
        self.representation_cosine = representation_cosine
        self.held_out_cosine = held_out_cosine
        self.representation_spread_fraction = representation_spread_fraction
        self.representation_fraction = representation_fraction
        self.dimensional_fraction = dimensional_fraction
        self.unused_fraction = unused_fraction
        self.unique_fraction_threshold = unique_fraction_threshold
        self.unique_eps = str(unique_eps)
        self.skipped_fraction = skipped_fraction
        self.enabled = names
        self._counters: dict[str, int] = {name: 0 for name in ALARM_NAMES}
        self._fired: dict[str, Alarm] = {}
        # the highest value of each history-relative metric (the rank's from step 0, see module doc)
        self._peaks: dict[str, float] = {}
        # the mean assignment entropy at the previous checked update (uniform_collapse's trend)
        self._previous_entropy: float | None = None

    # ------------------------------------------------------------------ state
    @property
    def fired(self) -> dict[str, Alarm]:
        """Alarms fired so far, by name."""
        return dict(self._fired)

    def state_dict(self) -> dict[str, Any]:
        """The consecutive-failure counters, the alarms fired so far and the history peaks."""
        return {
            "counters": dict(self._counters),
            "fired": {name: alarm.to_dict() for name, alarm in self._fired.items()},
            "peaks": dict(self._peaks),
            "previous_entropy": self._previous_entropy,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: an alarm that fired before does not fire again."""
        counters = state.get("counters", {})
        self._counters = {name: int(counters.get(name, 0)) for name in ALARM_NAMES}
        # the tier comes from the rule, so that alarms saved before the tiers existed get theirs
        self._fired = {name: Alarm(**{**data, "tier": _RULES[name].tier if name in _RULES else data.get("tier", "collapse")})
                       for name, data in state.get("fired", {}).items()}
        # absent from states saved before the history-relative checks: the history restarts
        self._peaks = {str(k): float(v) for k, v in state.get("peaks", {}).items()}
        previous = state.get("previous_entropy")
        self._previous_entropy = None if previous is None else float(previous)

    # ----------------------------------------------------------------- checks
    def _k(self, metrics: Mapping[str, Any]) -> int | None:
        if self.num_prototypes is not None:
            return self.num_prototypes
        k = _number(metrics, "num_prototypes")
        return int(k) if k is not None and k >= 2 else None

    def _check_uniform(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        k = self._k(m)
        h = _number(m, "mean_entropy")
        if h is not None and k is not None:
            ln_k = math.log(k)
            previous = self._previous_entropy
            if previous is not None and h < previous - self.uniform_falling_tol * ln_k:
                return _HEALTHY  # near ln K but sharpening: a head leaving its uniform start
            if h >= (1.0 - self.uniform_entropy_tol) * ln_k:
                return h, (
                    f"mean assignment entropy {h:.4f} nats is at ln K = ln {k} = {ln_k:.4f}: "
                    "every sample is assigned uniformly"
                )
            return _HEALTHY
        loss = _number(m, "loss")
        ref: float | None = None
        what = ""
        if self.uniform_loss_reference is not None:
            ref, what = float(self.uniform_loss_reference), "the loss of a collapsed model"
        elif k is not None:
            ref, what = math.log(k), f"ln K = ln {k}"
        if loss is None or ref is None:
            return None
        if abs(loss - ref) < self.uniform_rel_tol * abs(ref):
            return loss, (
                f"loss {loss:.4f} sits at {what} = {ref:.4f}: every sample gets the same "
                "assignment (uniform over the prototypes, or for a loss with a flat collapse "
                "plateau such as CPLearn's, any shared one)"
            )
        return _HEALTHY

    def _check_one_hot(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        p = _number(m, "max_prob")
        if p is None:
            return None
        if p <= self.one_hot_threshold:
            return _HEALTHY
        used = _number(m, "argmax_used")
        eff = _number(m, "effective_prototypes")
        k = self._k(m)
        n = _number(m, "num_samples")
        if k is not None and n is not None and n >= 1:
            k = min(k, int(n))
        limit = max(2.0, self.one_hot_max_effective_fraction * k) if k else 2.0
        if used is not None and k is not None:
            if used > limit:
                return _HEALTHY
            return p, (
                f"the batch's samples fall on {used:.0f} of the {k} prototypes it can use "
                f"(mean max assignment probability {p:.3f}): assignments are one-hot on a few "
                "prototypes"
            )
        if eff is not None:
            if eff >= limit:
                return _HEALTHY
            return p, (
                f"mean max assignment probability {p:.4f} > {self.one_hot_threshold} and only "
                f"{eff:.2f} effective prototypes: assignments are one-hot on one prototype"
            )
        return None

    def _check_representation(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        batch = self._representation_of_batch(m)
        held_out = self._shared_direction(m, HELD_OUT_PREFIX, self.held_out_cosine, "held-out images'")
        return _either(batch, held_out)

    def _representation_of_batch(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        std = _number(m, "embedding_std")
        if std is None:
            return None
        dim = self.embedding_dim
        if dim is None:
            d = _number(m, "embedding_dim")
            dim = int(d) if d is not None and d >= 1 else None
        if dim is not None:
            healthy = 1.0 / math.sqrt(dim)
            limit = self.representation_fraction * healthy
            if std < limit:
                mdn = _number(m, "mean_direction_norm")
                extra = f", mean direction norm {mdn:.3f}" if mdn is not None else ""
                return std, (
                    f"embedding std {std:.2e} < {self.representation_fraction} x 1/sqrt(D) = "
                    f"{limit:.2e} (healthy ~ {healthy:.3f} for D = {dim}){extra}"
                )
        result = self._shared_direction(m, "", self.representation_cosine, "")
        if result is None:
            return _HEALTHY if dim is not None else None
        return result

    def _shared_direction(self, m: Mapping[str, Any], prefix: str, cosine_limit: float,
                          whose: str) -> tuple[float, str] | None:
        """Mean pairwise cosine above ``cosine_limit`` while the spread fell below
        ``representation_spread_fraction`` of its peak, on the ``prefix``-ed metrics."""
        std = _number(m, f"{prefix}embedding_std")
        cosine = _number(m, f"{prefix}mean_cosine")
        peak = self._peaks.get(f"{prefix}embedding_std")
        if std is None or cosine is None or peak is None:
            return None
        if cosine > cosine_limit and std < self.representation_spread_fraction * peak:
            return cosine, (
                f"mean pairwise cosine of the {whose + ' ' if whose else ''}embeddings {cosine:.3f} > {cosine_limit} and "
                f"their spread (embedding std) {std:.2e} fell below {self.representation_spread_fraction} "
                f"of its highest value {peak:.2e}: every embedding points the same way"
            )
        return _HEALTHY

    def _check_dimensional(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        return _either(self._few_directions(m, "", "the embeddings"),
                       self._few_directions(m, HELD_OUT_PREFIX, "the held-out images' embeddings"))

    def _few_directions(self, m: Mapping[str, Any], prefix: str, whose: str) -> tuple[float, str] | None:
        rank = _number(m, f"{prefix}direction_rank")
        peak = self._peaks.get(f"{prefix}direction_rank")
        if rank is None or peak is None:
            return None
        if rank >= self.dimensional_fraction * peak:
            return _HEALTHY
        return rank, (
            f"{whose} span {rank:.1f} effective directions (RankMe of the normalised, "
            f"centred {'batch' if not prefix else 'set'}), below {self.dimensional_fraction} of the "
            f"{peak:.1f} they spanned earlier in this run"
        )

    def _check_unused(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        k = self._k(m)
        n = _number(m, "num_samples")
        used = _number(m, "argmax_used")
        util = _number(m, "prototype_utilization")
        if k is not None and n is not None and n >= 1 and (used is not None or util is not None):
            count = used if used is not None else util * k  # type: ignore[operator]
            possible = min(k, int(n))
            frac = count / possible
            detail = f"{count:.0f} of the {possible} prototypes a batch of {int(n)} can use"
        elif util is not None:
            frac, detail = util, f"utilisation {util:.3f}"
        elif used is not None and k is not None:
            frac, detail = used / k, f"{used:.0f} of {k} prototypes"
        else:
            return None
        if frac >= self.unused_fraction:
            return _HEALTHY
        return frac, (
            f"only {frac:.1%} of the prototypes are used ({detail}); threshold "
            f"{self.unused_fraction:.0%}"
        )

    def _check_prototype_collapse(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        u = _number(m, f"unique_{self.unique_eps}")
        if u is None:
            return None
        if u >= self.unique_fraction_threshold:
            return _HEALTHY
        return u, (
            f"only {u:.1%} of the prototypes are unique at eps = {self.unique_eps} "
            f"(threshold {self.unique_fraction_threshold:.0%})"
        )

    def _check_skipped_steps(self, m: Mapping[str, Any]) -> tuple[float, str] | None:
        skipped, steps = _number(m, "skipped_steps"), _number(m, "steps")
        if skipped is None or steps is None or steps < 1:
            return None
        frac = skipped / steps
        if frac <= self.skipped_fraction:
            return _HEALTHY
        return frac, (
            f"{skipped:.0f} of {steps:.0f} steps ({frac:.0%}) were skipped because the loss was "
            f"not finite (train.nonfinite=skip): the model learned from {1 - frac:.0%} of its batches"
        )

    # ----------------------------------------------------------------- update
    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alarm]:
        """Check one step's metrics; return the alarms that fire now (each only once)."""
        step = int(step)
        in_warmup = step < self.warmup_steps
        for key, from_start in _HISTORY_KEYS.items():
            if in_warmup and not from_start:
                continue
            value = _number(metrics, key)
            if value is not None and value > self._peaks.get(key, -math.inf):
                self._peaks[key] = value
        if in_warmup:
            return []
        new: list[Alarm] = []
        for name in self.enabled:
            if name in self._fired:
                continue
            rule = _RULES[name]
            result = getattr(self, rule.check)(metrics)
            if result is None:  # metric missing: skip, keep the counter
                continue
            value, message = result
            if not message:  # healthy
                self._counters[name] = 0
                continue
            self._counters[name] += 1
            if self._counters[name] >= self.patience:
                alarm = Alarm(
                    name=name,
                    step=step,
                    value=float(value),
                    message=f"{message} ({self._counters[name]} consecutive checks)",
                    cause=rule.cause,
                    remedy=rule.remedy,
                    tier=rule.tier,
                )
                self._fired[name] = alarm
                new.append(alarm)
        entropy = _number(metrics, "mean_entropy")
        if entropy is not None:
            self._previous_entropy = entropy
        return new
