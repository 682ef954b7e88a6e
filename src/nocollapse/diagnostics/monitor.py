"""Live collapse monitoring for any training loop, and the adapter our trainer uses.

:class:`CollapseMonitor` is fed from any loop (``monitor.update(step, probs=..., embeddings=...,
loss=...)``, every argument optional; ``monitor.end_epoch(prototypes=...)`` at epoch boundaries).
Every update it records, from tensors the step already computed, which prototype each sample
picked (for the epoch's utilisation) and a queue of recent backbone features. Every
``log_every``-th update it turns the step's assignments and embeddings into cheap metrics
(entropies, effective prototypes, max probability, teacher-student KL, embedding std) and feeds
the alarms. At the end of every epoch it measures the prototype geometry (unique prototypes at
each standard epsilon, pairwise cosine; not for fixed prototypes, which are distinct by
construction), the epoch's prototype utilisation, the effective rank of the queued features and,
for mixture prototypes, the weights' perplexity and idle components. Each returns its metrics as
a dict; given ``log_dir`` the monitor also writes them to ``log_dir/metrics.jsonl`` and
TensorBoard and :meth:`CollapseMonitor.plot` draws the training curves. Under
``torch.distributed`` only rank 0 writes and raises alarms (every rank computes on its own shard).

Given a ``probe`` (an :class:`~nocollapse.evaluation.online.OnlineProbe`, or any object with its
``update`` / ``end_epoch`` / ``evaluate`` / ``state_dict`` methods) and ``labels`` in
:meth:`CollapseMonitor.update`, the monitor also runs an online k-NN and linear probe on the
detached features (the embeddings when no features are given) and reports their accuracies with
the step and epoch metrics.

:class:`TrainingMonitor` builds one from a run's config and method and reads the method only
through the hooks of :class:`~nocollapse.methods.base.SSLMethod` (``num_prototypes``,
``embedding_dim``, ``uniform_loss``, ``fixed_prototypes`` and ``prototype_set``, or
``prototype_vectors``, ``mixture_weights`` and ``idle_prototypes`` for a method without a set).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..utils import distributed as dist_utils
from ..utils.metrics_log import MetricsLogger
from .alarms import ALARM_NAMES, Alarm, AlarmMonitor
from .assignments import assignment_stats, mixture_stats, teacher_student_kl
from .embeddings import effective_rank, embedding_std, mean_direction_norm
from .plots import plot_training_curves
from .prototypes import STANDARD_EPS, pairwise_cosine_stats, unique_prototypes

log = logging.getLogger("nocollapse")

_STEP_KEYS = ("mean_entropy", "entropy_of_mean", "effective_prototypes", "argmax_used", "max_prob")

__all__ = ["CollapseMonitor", "TrainingMonitor"]


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


class CollapseMonitor:
    """Collapse measures and alarms for any training loop (see the module doc).

    Args:
        num_prototypes: K, when the model has prototypes (taken from the first ``probs`` otherwise).
        embedding_dim: D of the embeddings, for the representation-collapse alarm (taken from the
            first ``embeddings`` otherwise).
        warmup_steps: steps before any alarm may fire (at initialisation assignments are nearly
            uniform, so the loss starts at ln K).
        log_every: compute the step metrics and check the alarms every this many updates.
        patience: consecutive checks a failure must persist before its alarm fires.
        alarms: raise alarms at all.
        uniform_loss: the loss of a collapsed model if it is not ln K (ln N_B for CARP).
        fixed_prototypes: prototypes distinct by construction: no geometry is measured.
        prototype_collapse_eps / prototype_collapse_threshold: the epoch alarm on unique prototypes.
        queue_size: recent features kept for the per-epoch effective rank.
        log_dir: write every returned dict to ``log_dir/metrics.jsonl`` (and TensorBoard).
        probe: an online probe fed by the ``labels`` of :meth:`update` (see the module doc).
    """

    def __init__(self, num_prototypes: int | None = None, embedding_dim: int | None = None, *,
                 warmup_steps: int = 0, log_every: int = 1, patience: int = 5, alarms: bool = True,
                 uniform_loss: float | None = None, fixed_prototypes: bool = False,
                 prototype_collapse_eps: str = "0.1", prototype_collapse_threshold: float = 0.5,
                 queue_size: int = 4096, log_dir: str | Path | None = None, tensorboard: bool = True,
                 probe: Any = None) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.num_prototypes = num_prototypes
        self.embedding_dim = embedding_dim
        self.warmup_steps = warmup_steps
        self.log_every = log_every
        self.patience = patience
        self.alarms_enabled = alarms
        self.uniform_loss = uniform_loss
        self.fixed_prototypes = fixed_prototypes
        self.prototype_collapse_eps = prototype_collapse_eps
        self.prototype_collapse_threshold = prototype_collapse_threshold
        self.queue_size = queue_size
        self.probe = probe
        self.main = dist_utils.rank() == 0
        self.features: deque[torch.Tensor] = deque()
        self.queued = 0
        self.argmax_counts: torch.Tensor | None = None
        self.last_prototypes: torch.Tensor | None = None   # the latest given to update()
        self.alarms: list[Alarm] = []
        self.records: list[dict[str, Any]] = []
        self.updates = 0
        self.epoch = 0
        self.logger = None
        if log_dir is not None and self.main:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.logger = MetricsLogger(log_dir, tensorboard=tensorboard)
        self.step_alarms: AlarmMonitor | None = None
        self.epoch_alarms: AlarmMonitor | None = None
        if num_prototypes is not None or embedding_dim is not None:
            self._build_alarms()

    # ---- set-up ------------------------------------------------------------------------
    def _build_alarms(self) -> None:
        step_names = tuple(n for n in ALARM_NAMES if n != "prototype_collapse") if self.alarms_enabled else ()
        k = self.num_prototypes if self.num_prototypes and self.num_prototypes >= 2 else None
        self.step_alarms = AlarmMonitor(
            k, self.embedding_dim,
            warmup_steps=self.warmup_steps, patience=self.patience, uniform_loss_reference=self.uniform_loss,
            enabled=step_names)
        # geometry is measured once per epoch, so one bad epoch is enough
        self.epoch_alarms = AlarmMonitor(
            k, warmup_steps=self.warmup_steps, patience=1, unique_fraction_threshold=self.prototype_collapse_threshold,
            unique_eps=self.prototype_collapse_eps,
            enabled=("prototype_collapse",) if self.alarms_enabled and not self.fixed_prototypes else ())
        if self.num_prototypes and self.argmax_counts is None:
            self.argmax_counts = torch.zeros(self.num_prototypes, dtype=torch.long)

    def _ensure(self, probs: torch.Tensor | None, embeddings: torch.Tensor | None) -> None:
        changed = False
        if self.num_prototypes is None and probs is not None:
            self.num_prototypes, changed = int(probs.shape[1]), True
        if self.embedding_dim is None and embeddings is not None:
            self.embedding_dim, changed = int(embeddings.shape[1]), True
        if changed or self.step_alarms is None:
            fired = (self.step_alarms.state_dict() if self.step_alarms is not None else None,
                     self.epoch_alarms.state_dict() if self.epoch_alarms is not None else None)
            self._build_alarms()
            if fired[0] is not None:
                self.step_alarms.load_state_dict(fired[0])
                self.epoch_alarms.load_state_dict(fired[1])

    # ---- every step ----------------------------------------------------------------------
    def observe(self, probs: torch.Tensor | None = None, features: torch.Tensor | None = None) -> None:
        """Per-step bookkeeping only: the arg-max counts of ``probs`` and the feature queue."""
        if probs is not None:
            self._ensure(probs, None)
            picks = probs.detach().argmax(dim=1).cpu()
            self.argmax_counts += torch.bincount(picks, minlength=self.num_prototypes)
        if features is not None:
            self.features.append(features.detach().float().cpu())
            self.queued += features.shape[0]
            while self.queued - self.features[0].shape[0] >= self.queue_size:
                self.queued -= self.features.popleft().shape[0]

    def step_metrics(self, step: int, *, probs: torch.Tensor | None = None,
                     student_probs: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
                     loss: float | None = None) -> dict[str, Any]:
        """The cheap metrics of one step and the step alarms (no bookkeeping)."""
        self._ensure(probs, embeddings)
        metrics: dict[str, Any] = {}
        alarm_input: dict[str, Any] = {}
        if probs is not None:
            stats = assignment_stats(probs)
            metrics.update({k: stats[k] for k in _STEP_KEYS})
            if student_probs is not None:
                metrics["teacher_student_kl"] = teacher_student_kl(
                    probs, torch.log(student_probs.detach().clamp_min(1e-30)))
            alarm_input.update(stats)
        if embeddings is not None:
            metrics["embedding_std"] = embedding_std(embeddings)
            metrics["mean_direction_norm"] = mean_direction_norm(embeddings)
        alarm_input.update(metrics)
        if loss is not None:
            alarm_input["loss"] = float(loss)
        self._raise(self.step_alarms.update(step, alarm_input))
        return metrics

    def update(self, step: int, *, prototypes: torch.Tensor | None = None, probs: torch.Tensor | None = None,
               student_probs: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
               features: torch.Tensor | None = None, loss: float | torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Feed one training step; every argument is optional.

        ``probs`` ``[B, K]``: the (teacher) assignment probabilities; ``student_probs``: the
        student's, for the teacher-student KL; ``embeddings`` ``[B, D]``: the (normalised)
        bottleneck embeddings; ``features`` ``[B, F]``: backbone features for the epoch's
        effective rank; ``prototypes`` ``[K, D]``: kept for :meth:`end_epoch`; ``labels``
        ``[B]`` (``-1`` = unlabelled): fed with the features to the monitor's ``probe``, every
        update. Returns the step metrics on every ``log_every``-th update, ``{}`` otherwise."""
        if prototypes is not None:
            self.last_prototypes = prototypes.detach()
            if self.num_prototypes is None:
                self.num_prototypes = int(prototypes.shape[0])
        probe_metrics = self._probe_update(labels, features if features is not None else embeddings)
        self.observe(probs, features)
        self.updates += 1
        if (self.updates - 1) % self.log_every:
            return {}
        loss_value = float(loss) if loss is not None else None
        metrics = self.step_metrics(step, probs=probs, student_probs=student_probs, embeddings=embeddings,
                                    loss=loss_value)
        metrics.update(probe_metrics)
        record = {"step": int(step), "epoch": self.epoch, **({"loss": loss_value} if loss is not None else {}),
                  **metrics}
        self._write(record)
        return metrics

    def _probe_update(self, labels: torch.Tensor | None, features: torch.Tensor | None) -> dict[str, Any]:
        if labels is None:
            return {}
        if self.probe is None:
            raise ValueError("labels were given but the monitor has no probe: build it with "
                             "CollapseMonitor(..., probe=OnlineProbe(num_classes))")
        if features is None:
            raise ValueError("labels need features (or embeddings) for the online probe")
        return self.probe.update(features.detach(), labels)

    def evaluate(self, step: int, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The probe's accuracy on held-out labelled features (a validation split), without
        learning from them; written like the other metrics."""
        if self.probe is None:
            raise ValueError("evaluate needs a probe: CollapseMonitor(..., probe=OnlineProbe(num_classes))")
        metrics = self.probe.evaluate(features.detach(), labels)
        self._write({"step": int(step), "epoch": self.epoch, **metrics})
        return metrics

    # ---- every epoch ---------------------------------------------------------------------
    def end_epoch(self, step: int | None = None, *, prototypes: Any = None,
                  mixture_weights: torch.Tensor | None = None, idle: torch.Tensor | None = None) -> dict[str, Any]:
        """Epoch metrics: prototype geometry (``prototypes`` or the last ones given to
        :meth:`update`), the epoch's utilisation, the queued features' effective rank, the mixture
        weights; checks the epoch alarm and starts a new epoch.

        ``prototypes`` is a ``[K, D]`` tensor or a prototype set (any object with ``snapshot()``,
        such as :class:`~nocollapse.prototypes.base.PrototypeSet`: learned, decoupled or fixed);
        a set brings its own mixture weights, idle mask and whether it is fixed, so
        ``mixture_weights`` and ``idle`` are for tensors only."""
        self._ensure(None, None)
        step = self.updates if step is None else int(step)
        metrics: dict[str, Any] = {}
        fixed = self.fixed_prototypes
        if prototypes is not None and hasattr(prototypes, "snapshot"):
            if mixture_weights is not None or idle is not None:
                raise ValueError("a prototype set brings its own mixture weights and idle mask: pass "
                                 "mixture_weights and idle only with a prototype tensor")
            snap = prototypes.snapshot()
            prototypes, mixture_weights, idle = snap.vectors, snap.usage_weights, snap.idle
            fixed = fixed or snap.fixed
            if not len(prototypes):           # a mixture with no component placed yet
                prototypes = mixture_weights = idle = None
        elif prototypes is not None and not isinstance(prototypes, torch.Tensor):
            raise TypeError(f"prototypes must be a [K, D] tensor or a prototype set with snapshot(), got "
                            f"{type(prototypes).__name__}")
        if prototypes is None:
            prototypes = self.last_prototypes
        if prototypes is not None and not fixed:
            p = prototypes.detach().float().cpu()
            for eps, n in unique_prototypes(p, STANDARD_EPS).items():
                metrics[f"unique_{eps:g}"] = n / p.shape[0]
            pc = pairwise_cosine_stats(p)
            metrics["pairwise_cosine_max"] = pc["max"]
            metrics["pairwise_cosine_p99"] = pc["p99"]
        if self.argmax_counts is not None and int(self.argmax_counts.sum()) > 0:
            metrics["prototype_utilization_train"] = float((self.argmax_counts > 0).float().mean())
        if self.features:
            metrics["effective_rank"] = effective_rank(torch.cat(list(self.features)))
        if mixture_weights is not None:
            mix = mixture_stats(mixture_weights.detach().cpu(), idle=_cpu(idle))
            metrics["mixture_perplexity"] = mix["perplexity"]
            metrics["mixture_dead"] = mix["dead"]
        if self.probe is not None:
            metrics.update(self.probe.end_epoch())
        if self.argmax_counts is not None:
            self.argmax_counts.zero_()
        self._raise(self.epoch_alarms.update(step, metrics))
        self.epoch += 1
        self._write({"step": step, "epoch": self.epoch, **metrics})
        return metrics

    # ---- output --------------------------------------------------------------------------
    def _raise(self, alarms: list[Alarm]) -> None:
        for alarm in alarms:
            self.alarms.append(alarm)
            if self.main:
                log.warning("%s", alarm)

    def _write(self, record: dict[str, Any]) -> None:
        if self.logger is None:
            return
        self.records.append(record)
        self.logger.log(record)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """The training curves of what :meth:`update` and :meth:`end_epoch` recorded (with a
        ``log_dir``), into ``out_dir/training_curves.png``."""
        if not self.records:
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [plot_training_curves(self.records, out / "training_curves.png")]

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._ensure(None, None)
        return {"step_alarms": self.step_alarms.state_dict(), "epoch_alarms": self.epoch_alarms.state_dict(),
                "argmax_counts": self.argmax_counts.clone() if self.argmax_counts is not None
                else torch.zeros(0, dtype=torch.long),
                "updates": self.updates, "epoch": self.epoch,
                **({"probe": self.probe.state_dict()} if self.probe is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure(None, None)
        self.step_alarms.load_state_dict(state["step_alarms"])
        self.epoch_alarms.load_state_dict(state["epoch_alarms"])
        if self.argmax_counts is not None and state["argmax_counts"].numel() == self.argmax_counts.numel():
            self.argmax_counts.copy_(state["argmax_counts"])
        self.updates = int(state.get("updates", self.updates))
        self.epoch = int(state.get("epoch", self.epoch))
        if self.probe is not None and "probe" in state:
            self.probe.load_state_dict(state["probe"])
        self.alarms = sorted([*self.step_alarms.fired.values(), *self.epoch_alarms.fired.values()],
                             key=lambda a: a.step)


class TrainingMonitor(CollapseMonitor):
    """The :class:`CollapseMonitor` of a ``nocollapse train`` run, built from its config and method;
    the trainer logs the returned dicts itself."""

    def __init__(self, cfg: Config, method, steps_per_epoch: int, probe: Any = None) -> None:
        d = cfg.diagnostics
        self.enabled = d.enabled
        self.probe_metrics: dict[str, Any] = {}
        super().__init__(
            method.num_prototypes, method.embedding_dim,
            warmup_steps=int(round(d.alarm_warmup_epochs * steps_per_epoch)), patience=d.alarm_patience,
            alarms=d.alarms, uniform_loss=method.uniform_loss(),
            fixed_prototypes=bool(getattr(method, "fixed_prototypes", False)),
            prototype_collapse_eps=d.prototype_collapse_eps,
            prototype_collapse_threshold=d.prototype_collapse_threshold, queue_size=d.queue_size,
            probe=probe if d.enabled else None)

    def observe(self, out, labels: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Per-step bookkeeping; ``labels`` (all the batch's training labels) feed the probe."""
        if self.enabled:
            if self.probe is not None:
                self.probe_metrics = self._probe_update(
                    labels, out.features if out.features is not None else out.embeddings)
            super().observe(out.teacher_probs if self.num_prototypes else None, out.features)

    def step_metrics(self, step: int, loss: float, out) -> dict[str, Any]:  # type: ignore[override]
        if not self.enabled or out is None:
            return {}
        metrics = super().step_metrics(step, probs=out.teacher_probs, student_probs=out.student_probs,
                                       embeddings=out.embeddings, loss=loss)
        return {**metrics, **self.probe_metrics}

    def epoch_metrics(self, step: int, method) -> dict[str, Any]:
        if not self.enabled:
            return {}
        prototype_set = method.prototype_set()
        if prototype_set is not None:
            return self.end_epoch(step, prototypes=prototype_set)
        # a plugin method that reports its prototypes through the older hooks
        prototypes = None if self.fixed_prototypes else method.prototype_vectors()
        return self.end_epoch(step, prototypes=prototypes, mixture_weights=method.mixture_weights(),
                              idle=method.idle_prototypes())
