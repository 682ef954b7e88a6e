"""The collapse monitor of a training run.

Every step it records, from tensors the step already computed, which prototype each sample
picked (for the epoch's utilisation) and a queue of recent teacher backbone features. Every log
step it turns the step's teacher assignments and bottleneck embeddings into cheap metrics
(entropies, effective prototypes, max probability, teacher-student KL, embedding std) and feeds
the alarms. At the end of every epoch it measures the prototype geometry (unique prototypes at
each standard epsilon, pairwise cosine), the epoch's prototype utilisation, the effective rank of
the queued features (``effective_rank``) and, for mixture prototypes, the weights' perplexity
and the idle components. Fixed prototypes (``fixed_prototypes``: a random codebook) have no
geometry to watch; their usage is.

It reads the method only through the hooks of :class:`~nocollapse.methods.base.SSLMethod`
(``num_prototypes``, ``embedding_dim``, ``uniform_loss``, ``prototype_vectors``,
``mixture_weights``, ``idle_prototypes``).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch

from ..config import Config
from .alarms import ALARM_NAMES, Alarm, AlarmMonitor
from .assignments import assignment_stats, mixture_stats, teacher_student_kl
from .embeddings import effective_rank, embedding_std, mean_direction_norm
from .prototypes import STANDARD_EPS, pairwise_cosine_stats, unique_prototypes

log = logging.getLogger("nocollapse")

_STEP_KEYS = ("mean_entropy", "entropy_of_mean", "effective_prototypes", "argmax_used", "max_prob")


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


class TrainingMonitor:
    def __init__(self, cfg: Config, method, steps_per_epoch: int) -> None:
        d = cfg.diagnostics
        self.enabled = d.enabled
        self.num_prototypes = method.num_prototypes
        warmup = int(round(d.alarm_warmup_epochs * steps_per_epoch))
        step_alarms = tuple(n for n in ALARM_NAMES if n != "prototype_collapse") if d.alarms else ()
        self.step_alarms = AlarmMonitor(
            self.num_prototypes, method.embedding_dim, warmup_steps=warmup,
            patience=d.alarm_patience, uniform_loss_reference=method.uniform_loss(), enabled=step_alarms)
        # Geometry is measured once per epoch, so one bad epoch is enough.
        self.epoch_alarms = AlarmMonitor(
            self.num_prototypes, warmup_steps=warmup, patience=1,
            unique_fraction_threshold=d.prototype_collapse_threshold, unique_eps=d.prototype_collapse_eps,
            enabled=("prototype_collapse",) if d.alarms else ())
        self.features: deque[torch.Tensor] = deque()
        self.queued = 0
        self.queue_size = d.queue_size
        self.argmax_counts = torch.zeros(self.num_prototypes or 0, dtype=torch.long)
        self.alarms: list[Alarm] = []

    # ---- every step ----------------------------------------------------------------------
    def observe(self, out) -> None:
        if not self.enabled:
            return
        if out.teacher_probs is not None and self.num_prototypes:
            picks = out.teacher_probs.argmax(dim=1).cpu()
            self.argmax_counts += torch.bincount(picks, minlength=self.num_prototypes)
        if out.features is not None:
            self.features.append(out.features.cpu())
            self.queued += out.features.shape[0]
            while self.queued - self.features[0].shape[0] >= self.queue_size:
                self.queued -= self.features.popleft().shape[0]

    # ---- every log step ------------------------------------------------------------------
    def step_metrics(self, step: int, loss: float, out) -> dict[str, float]:
        if not self.enabled or out is None:
            return {}
        metrics: dict[str, Any] = {}
        if out.teacher_probs is not None:
            stats = assignment_stats(out.teacher_probs)
            metrics.update({k: stats[k] for k in _STEP_KEYS})
            if out.student_probs is not None:
                metrics["teacher_student_kl"] = teacher_student_kl(
                    out.teacher_probs, torch.log(out.student_probs.clamp_min(1e-30)))
            alarm_input = {**stats}
        else:
            alarm_input = {}
        if out.embeddings is not None:
            metrics["embedding_std"] = embedding_std(out.embeddings)
            metrics["mean_direction_norm"] = mean_direction_norm(out.embeddings)
        alarm_input.update(metrics, loss=loss)
        self._raise(self.step_alarms.update(step, alarm_input))
        return metrics

    # ---- every epoch ---------------------------------------------------------------------
    def epoch_metrics(self, step: int, method) -> dict[str, Any]:
        if not self.enabled:
            return {}
        metrics: dict[str, Any] = {}
        prototypes = None if getattr(method, "fixed_prototypes", False) else method.prototype_vectors()
        if prototypes is not None:
            counts = unique_prototypes(prototypes.detach().float().cpu(), STANDARD_EPS)
            for eps, n in counts.items():
                metrics[f"unique_{eps:g}"] = n / prototypes.shape[0]
            pc = pairwise_cosine_stats(prototypes.detach().float().cpu())
            metrics["pairwise_cosine_max"] = pc["max"]
            metrics["pairwise_cosine_p99"] = pc["p99"]
        if int(self.argmax_counts.sum()) > 0:
            metrics["prototype_utilization_train"] = float((self.argmax_counts > 0).float().mean())
        if self.features:
            metrics["effective_rank"] = effective_rank(torch.cat(list(self.features)))
        weights = method.mixture_weights()
        if weights is not None:
            mix = mixture_stats(weights.detach().cpu(), idle=_cpu(method.idle_prototypes()))
            metrics["mixture_perplexity"] = mix["perplexity"]
            metrics["mixture_dead"] = mix["dead"]
        self.argmax_counts.zero_()
        self._raise(self.epoch_alarms.update(step, metrics))
        return metrics

    def _raise(self, alarms: list[Alarm]) -> None:
        for alarm in alarms:
            self.alarms.append(alarm)
            log.warning("%s", alarm)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_alarms": self.step_alarms.state_dict(), "epoch_alarms": self.epoch_alarms.state_dict(),
                "argmax_counts": self.argmax_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_alarms.load_state_dict(state["step_alarms"])
        self.epoch_alarms.load_state_dict(state["epoch_alarms"])
        self.argmax_counts.copy_(state["argmax_counts"])
        self.alarms = sorted([*self.step_alarms.fired.values(), *self.epoch_alarms.fired.values()],
                             key=lambda a: a.step)
