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

Given ``held_out`` (a function of no arguments returning the ``[P, D]`` embeddings of a fixed
set of images, encoded with the network in eval mode and restored to training mode afterwards),
every check also measures the spread, mean pairwise cosine and direction rank of those
embeddings (``held_out_embedding_std``, ``held_out_mean_cosine``, ``held_out_direction_rank``),
which the representation and dimensional alarms read beside the batch's: batch norm in training
mode re-spreads a collapsed batch, held-out images in eval mode show the collapse (see
:mod:`~nocollapse.diagnostics.alarms`). The function is called only at checks (every
``log_every``-th update), under ``torch.no_grad``.

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
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..utils import distributed as dist_utils
from ..utils.metrics_log import MetricsLogger, read_jsonl
from .alarms import ALARM_NAMES, HELD_OUT_PREFIX, WARNINGS, Alarm, AlarmMonitor
from .assignments import assignment_stats, mixture_stats, teacher_student_kl
from .embeddings import direction_rank, effective_rank, embedding_std, mean_direction_norm, mean_pairwise_cosine
from .plots import plot_training_curves
from .prototypes import STANDARD_EPS, prototype_geometry

log = logging.getLogger("nocollapse")

_STEP_KEYS = ("mean_entropy", "entropy_of_mean", "effective_prototypes", "argmax_used", "max_prob")

__all__ = ["CollapseMonitor", "TrainingMonitor"]


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def _home_device(prototype_set: Any) -> torch.device | None:
    """The device a prototype set's tensors live on (its snapshot is on the CPU), if it has any."""
    if isinstance(prototype_set, torch.nn.Module):
        for tensor in prototype_set.parameters():
            return tensor.device
        for tensor in prototype_set.buffers():
            return tensor.device
    return None


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
        warnings: also report wasted capacity (``unused_prototypes``, ``prototype_collapse``: the
            warning tier of :data:`~nocollapse.diagnostics.alarms.WARNINGS`); ``False`` silences
            them and keeps the collapse alarms.
        uniform_loss: the loss of a collapsed model if it is not ln K (ln N_B for CARP).
        fixed_prototypes: prototypes distinct by construction: no geometry is measured.
        prototype_collapse_eps / prototype_collapse_threshold: the epoch alarm on unique prototypes.
        queue_size: recent features kept for the per-epoch effective rank.
        log_dir: write every returned dict to ``log_dir/metrics.jsonl`` (and TensorBoard).
        probe: an online probe fed by the ``labels`` of :meth:`update` (see the module doc).
        held_out: a function returning the ``[P, D]`` eval-mode embeddings of a fixed set of
            images, called at every check (see the module doc).
    """

    def __init__(self, num_prototypes: int | None = None, embedding_dim: int | None = None, *,
                 warmup_steps: int = 0, log_every: int = 1, patience: int = 3, alarms: bool = True,
                 warnings: bool = True, uniform_loss: float | None = None, fixed_prototypes: bool = False,
                 prototype_collapse_eps: str = "0.1", prototype_collapse_threshold: float = 0.5,
                 queue_size: int = 4096, log_dir: str | Path | None = None, tensorboard: bool = True,
                 probe: Any = None, held_out: Callable[[], torch.Tensor] | None = None) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.num_prototypes = num_prototypes
        self.embedding_dim = embedding_dim
        self.warmup_steps = warmup_steps
        self.log_every = log_every
        self.patience = patience
        self.alarms_enabled = alarms
        self.warnings_enabled = warnings
        self.uniform_loss = uniform_loss
        self.fixed_prototypes = fixed_prototypes
        self.prototype_collapse_eps = prototype_collapse_eps
        self.prototype_collapse_threshold = prototype_collapse_threshold
        self.queue_size = queue_size
        self.probe = probe
        if held_out is not None and not callable(held_out):
            raise TypeError("held_out must be a function returning the [P, D] embeddings of a fixed set of "
                            f"images in eval mode, got {type(held_out).__name__}")
        self.held_out = held_out
        self.main = dist_utils.rank() == 0
        self.features: deque[torch.Tensor] = deque()
        self.queued = 0
        self.argmax_counts: torch.Tensor | None = None
        self.last_prototypes: torch.Tensor | None = None   # the latest given to update()
        self.alarms: list[Alarm] = []
        self.records: list[dict[str, Any]] = []
        self.updates = 0
        self.epoch = 0
        self.last_step = -1                                # the last step a record was written for
        # the log opens at the first record, so that a restored monitor (load_state_dict before
        # any record) keeps the history of the steps before the restore
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.tensorboard = tensorboard
        self.logger: MetricsLogger | None = None
        self._resume_step: int | None = None
        self.step_alarms: AlarmMonitor | None = None
        self.epoch_alarms: AlarmMonitor | None = None
        if num_prototypes is not None or embedding_dim is not None:
            self._build_alarms()

    # ---- set-up ------------------------------------------------------------------------
    def _build_alarms(self) -> None:
        step_names = tuple(n for n in ALARM_NAMES if n != "prototype_collapse"
                           and (self.warnings_enabled or n not in WARNINGS)) if self.alarms_enabled else ()
        k = self.num_prototypes if self.num_prototypes and self.num_prototypes >= 2 else None
        self.step_alarms = AlarmMonitor(
            k, self.embedding_dim,
            warmup_steps=self.warmup_steps, patience=self.patience, uniform_loss_reference=self.uniform_loss,
            enabled=step_names)
        # geometry is measured once per epoch, so one bad epoch is enough
        self.epoch_alarms = AlarmMonitor(
            k, warmup_steps=self.warmup_steps, patience=1, unique_fraction_threshold=self.prototype_collapse_threshold,
            unique_eps=self.prototype_collapse_eps,
            enabled=("prototype_collapse",) if (self.alarms_enabled and self.warnings_enabled
                                                and not self.fixed_prototypes) else ())
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

    def _held_out_metrics(self) -> dict[str, float]:
        """The representation measures of the ``held_out`` function's embeddings."""
        with torch.no_grad():
            held_out = self.held_out()
        if not isinstance(held_out, torch.Tensor) or held_out.dim() != 2 or held_out.shape[0] < 2:
            shape = tuple(held_out.shape) if isinstance(held_out, torch.Tensor) else type(held_out).__name__
            raise ValueError(f"held_out() must return a [P, D] tensor with P >= 2 rows, got {shape}")
        held_out = held_out.detach().float()
        return {f"{HELD_OUT_PREFIX}embedding_std": embedding_std(held_out),
                f"{HELD_OUT_PREFIX}mean_cosine": mean_pairwise_cosine(held_out),
                f"{HELD_OUT_PREFIX}direction_rank": direction_rank(held_out)}

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
            # what representation_collapse (one shared direction) and dimensional_collapse (few
            # directions) read; the rank is an eigen-decomposition of the smaller Gram matrix
            metrics["mean_cosine"] = mean_pairwise_cosine(embeddings)
            metrics["direction_rank"] = direction_rank(embeddings)
        if self.held_out is not None:
            metrics.update(self._held_out_metrics())
        alarm_input.update(metrics)
        if loss is not None:
            alarm_input["loss"] = float(loss)
        self._raise(self.step_alarms.update(step, alarm_input))
        return metrics

    def update(self, step: int | None = None, *, prototypes: torch.Tensor | None = None,
               probs: torch.Tensor | None = None, student_probs: torch.Tensor | None = None,
               embeddings: torch.Tensor | None = None, features: torch.Tensor | None = None,
               loss: float | torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Feed one training step: ``step`` (the training step, required) and any of the tensors.

        ``probs`` ``[B, K]``: the (teacher) assignment probabilities; ``student_probs``: the
        student's, for the teacher-student KL; ``embeddings`` ``[B, D]``: the (normalised)
        bottleneck embeddings; ``features`` ``[B, F]``: backbone features for the epoch's
        effective rank; ``prototypes`` ``[K, D]``: kept for :meth:`end_epoch`; ``labels``
        ``[B]`` (``-1`` = unlabelled): fed with the features to the monitor's ``probe``, every
        update. Returns the step metrics on every ``log_every``-th update, ``{}`` otherwise.

        Shapes are checked: a ``probs`` that is not ``[B, K]`` with the monitor's K, or
        ``embeddings`` / ``features`` that are not matrices, raise ``ValueError``."""
        if step is None:
            raise TypeError("CollapseMonitor.update() needs the training step: monitor.update(step, probs=...)")
        self._check_inputs(probs=probs, student_probs=student_probs, embeddings=embeddings, features=features,
                           prototypes=prototypes)
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

    def _check_inputs(self, **tensors: torch.Tensor | None) -> None:
        """Clear errors for tensors of the wrong shape, before anything is recorded."""
        for name, value in tensors.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 2:
                shape = "[B, K]" if "probs" in name else "[K, D]" if name == "prototypes" else "[B, D]"
                raise ValueError(f"{name} must be a matrix {shape}, got shape {tuple(value.shape)}")
        probs, student = tensors.get("probs"), tensors.get("student_probs")
        k = self.num_prototypes
        for name, value in (("probs", probs), ("student_probs", student)):
            if value is not None and k is not None and value.shape[1] != k:
                raise ValueError(f"{name} has {value.shape[1]} columns but the monitor has K = {k} prototypes")
        if probs is not None and student is not None and probs.shape != student.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and student_probs {tuple(student.shape)} differ in shape")

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
            home = _home_device(prototypes)
            snap = prototypes.snapshot()
            prototypes, mixture_weights, idle = snap.vectors, snap.usage_weights, snap.idle
            if home is not None and home.type == "cuda":
                prototypes = prototypes.to(home)  # the geometry is computed where the set lives
            fixed = fixed or snap.fixed
            if not len(prototypes):           # a mixture with no component placed yet
                prototypes = mixture_weights = idle = None
        elif prototypes is not None and not isinstance(prototypes, torch.Tensor):
            raise TypeError(f"prototypes must be a [K, D] tensor or a prototype set with snapshot(), got "
                            f"{type(prototypes).__name__}")
        if prototypes is None:
            prototypes = self.last_prototypes
        if prototypes is not None and not fixed:
            # exact unique counts up to EXACT_MAX_ROWS prototypes or on a CUDA device, a sampled
            # estimate above (unique_sampled_rows > 0, with unique_<eps>_stderr); see prototypes.py
            metrics.update(prototype_geometry(prototypes.detach().float(), STANDARD_EPS))
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
        self.last_step = max(self.last_step, int(record.get("step", self.last_step)))
        if self.log_dir is None or not self.main:
            return
        if self.logger is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # a fresh monitor starts a fresh metrics.jsonl; a restored one keeps the steps up to
            # the restored step and drops those an interrupted run logged after it
            self.logger = MetricsLogger(self.log_dir, tensorboard=self.tensorboard, resume_step=self._resume_step)
            self.records = read_jsonl(self.logger.path) if self._resume_step is not None else []
        self.records.append(record)
        self.logger.log(record)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """The training curves of what :meth:`update` and :meth:`end_epoch` recorded (with a
        ``log_dir``), into ``out_dir/training_curves.png``."""
        if self.log_dir is None:
            warnings.warn("CollapseMonitor.plot() has nothing to plot: the monitor keeps records only with "
                          "a log_dir (CollapseMonitor(..., log_dir=DIR))", stacklevel=2)
            return []
        if not self.records:
            warnings.warn("CollapseMonitor.plot() has nothing to plot yet: no step was recorded", stacklevel=2)
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [plot_training_curves(self.records, out / "training_curves.png")]

    def close(self) -> None:
        """Flush and close ``metrics.jsonl`` and TensorBoard (a later record reopens them)."""
        if self.logger is not None:
            self.logger.close()

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The alarms fired, the epoch's arg-max counts, the counters, the last logged step and the
        probe's state: what :meth:`load_state_dict` needs to go on after a resume."""
        self._ensure(None, None)
        return {"step_alarms": self.step_alarms.state_dict(), "epoch_alarms": self.epoch_alarms.state_dict(),
                "argmax_counts": self.argmax_counts.clone() if self.argmax_counts is not None
                else torch.zeros(0, dtype=torch.long),
                "updates": self.updates, "epoch": self.epoch, "last_step": self.last_step,
                **({"probe": self.probe.state_dict()} if self.probe is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: fired alarms stay fired, and (with a ``log_dir``) the
        log keeps its records up to the restored step and drops those after it."""
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
        if "last_step" in state:
            # the log keeps what was written up to the restored step; the next record reopens it
            self.last_step = int(state["last_step"])
            self._resume_step = self.last_step
            if self.logger is not None:
                self.logger.close()
                self.logger = None


class TrainingMonitor(CollapseMonitor):
    """The :class:`CollapseMonitor` of a ``nocollapse train`` run, built from its config and method;
    the trainer logs the returned dicts itself."""

    def __init__(self, cfg: Config, method, steps_per_epoch: int, probe: Any = None,
                 held_out: Callable[[], torch.Tensor] | None = None) -> None:
        d = cfg.diagnostics
        self.enabled = d.enabled
        self.probe_metrics: dict[str, Any] = {}
        super().__init__(
            method.num_prototypes, method.embedding_dim,
            warmup_steps=int(round(d.alarm_warmup_epochs * steps_per_epoch)), patience=d.alarm_patience,
            alarms=d.alarms, warnings=d.warnings, uniform_loss=method.uniform_loss(),
            fixed_prototypes=bool(getattr(method, "fixed_prototypes", False)),
            prototype_collapse_eps=d.prototype_collapse_eps,
            prototype_collapse_threshold=d.prototype_collapse_threshold, queue_size=d.queue_size,
            probe=probe if d.enabled else None, held_out=held_out if d.enabled else None)
        # not a collapse: the share of optimisation steps skipped for a non-finite loss. The
        # fraction is cumulative, so one check that exceeds it is enough (patience 1).
        self.run_alarms = AlarmMonitor(warmup_steps=0, patience=1,
                                       enabled=("skipped_steps",) if d.alarms else ())

    def check_skipped_steps(self, step: int, skipped: int, final: bool = False) -> None:
        """The ``skipped_steps`` alarm: more than half of the ``step`` steps so far were skipped.
        Checked at log steps after the alarm warm-up, and at the end of the run (``final``)
        whatever its length, so a short run that skipped most of its steps is not let through."""
        if final or step >= self.warmup_steps:
            self._raise(self.run_alarms.update(step, {"skipped_steps": skipped, "steps": step}))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_alarms": self.run_alarms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "run_alarms" in state:  # absent from checkpoints written before the alarm existed
            self.run_alarms.load_state_dict(state["run_alarms"])
            self.alarms = sorted([*self.alarms, *self.run_alarms.fired.values()], key=lambda a: a.step)

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
        student_probs = out.student_probs() if callable(out.student_probs) else out.student_probs
        metrics = super().step_metrics(step, probs=out.teacher_probs, student_probs=student_probs,
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
