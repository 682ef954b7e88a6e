"""A Lightning callback that watches a LightningModule for collapse with :class:`CollapseMonitor`.

Needs the optional extra: ``pip install 'nocollapse[lightning]'`` (the ``lightning`` package).

What the LightningModule provides:

- ``training_step`` returns a dict: ``"loss"`` as usual, plus any of ``"probs"`` ``[B, K]``
  (teacher assignment probabilities), ``"student_probs"`` ``[B, K]``, ``"embeddings"``
  ``[B, D]`` (the normalised bottleneck or projection), ``"features"`` ``[B, F]`` (backbone
  features) and ``"labels"`` ``[B]`` (``-1`` = unlabelled; used only when the monitor has a
  ``probe``). Each is read after the optimiser step and detached; missing keys are skipped.
- optionally ``collapse_prototypes()``: the prototypes ``[K, D]`` to measure at the end of each
  training epoch, or a prototype set (:class:`~nocollapse.prototypes.base.PrototypeSet`:
  learned, :class:`~nocollapse.DecoupledPrototypes` or fixed; or a bare
  :class:`~nocollapse.prototypes.gmm.OnlineGMM`), whose vectors, weights and idle components are
  read as ``nocollapse train`` reads them.
  Without it, the epoch measures the prototypes last returned under ``"prototypes"``, if any.
- optionally ``validation_step`` returning ``"features"`` and ``"labels"``: with a probe, the
  validation epoch reports ``val_online_knn_top1`` / ``val_online_linear_top1``.

Every metric dict the monitor returns is also logged through ``pl_module.log_dict`` under
``collapse/<name>`` (so it reaches whatever logger the Trainer has), from every rank with no
synchronisation: each rank measures its own shard and Lightning's loggers write rank 0's. Alarm
names in ``stop_on`` stop training (the decision is shared by all ranks). The monitor's state,
alarms included, is saved in Lightning checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..diagnostics.alarms import ALARM_NAMES
from ..diagnostics.monitor import CollapseMonitor
from ..prototypes.base import PrototypeSet, PrototypeSnapshot
from ..prototypes.gmm import OnlineGMM

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("nocollapse.integrations.lightning needs Lightning: "
                      "pip install 'nocollapse[lightning]'") from error

__all__ = ["CollapseMonitorCallback", "STEP_OUTPUT_KEYS"]

#: The keys of ``training_step``'s dict that the callback passes to :meth:`CollapseMonitor.update`.
STEP_OUTPUT_KEYS = ("probs", "student_probs", "embeddings", "features", "labels", "prototypes")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {f"collapse/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CollapseMonitorCallback(pl.Callback):
    """Feeds a :class:`CollapseMonitor` from a LightningModule's step outputs (see the module doc).

    Args:
        monitor: the monitor to feed; built from ``monitor_options`` when not given (for example
            ``num_prototypes``, ``warmup_steps``, ``log_every``, ``log_dir``, ``probe``).
        stop_on: alarm names that stop training when they fire (for example
            ``("one_hot_collapse", "uniform_collapse")``).
        log_to_lightning: also log every metric with ``pl_module.log_dict``.
        plot_dir: where :meth:`CollapseMonitor.plot` draws the curves when fitting ends
            (needs a monitor with a ``log_dir``); ``None``: the monitor's ``log_dir``.
    """

    def __init__(self, monitor: CollapseMonitor | None = None, *, stop_on: Iterable[str] = (),
                 log_to_lightning: bool = True, plot_dir: str | None = None, **monitor_options: Any) -> None:
        super().__init__()
        if monitor is not None and monitor_options:
            raise ValueError(f"pass either a monitor or its options, not both: {sorted(monitor_options)}")
        self.monitor = monitor if monitor is not None else CollapseMonitor(**monitor_options)
        self.stop_on = tuple(stop_on)
        unknown = sorted(set(self.stop_on) - set(ALARM_NAMES))
        if unknown:
            raise ValueError(f"unknown alarm names in stop_on: {unknown}; known: {list(ALARM_NAMES)}")
        self.log_to_lightning = log_to_lightning
        self.plot_dir = plot_dir
        self._val_features: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    # ---- training ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if outputs is None:                                  # the step was skipped
            return
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        if not isinstance(outputs, Mapping):
            raise TypeError(f"training_step must return a tensor or a dict for the collapse monitor, got "
                            f"{type(outputs).__name__}")
        given = {k: outputs[k] for k in STEP_OUTPUT_KEYS if outputs.get(k) is not None}
        if self.monitor.probe is None:
            given.pop("labels", None)                        # labels are for a probe only
        loss = outputs.get("loss")
        metrics = self.monitor.update(trainer.global_step, loss=None if loss is None else loss.detach(), **given)
        self._log(pl_module, metrics, on_step=True)
        self._maybe_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = pl_module.collapse_prototypes() if hasattr(pl_module, "collapse_prototypes") else None
        if isinstance(source, OnlineGMM) and not isinstance(source, PrototypeSet):
            source = _SeededMixture(source)                  # a bare mixture: its placed components
        metrics = self.monitor.end_epoch(trainer.global_step, prototypes=source)
        self._log(pl_module, metrics, on_step=False)
        self._maybe_stop(trainer)

    # ---- validation (the online probe on held-out rows) ------------------------------------
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.monitor.probe is None or not isinstance(outputs, Mapping):
            return
        if outputs.get("features") is not None and outputs.get("labels") is not None:
            self._val_features.append(outputs["features"].detach().float().cpu())
            self._val_labels.append(torch.as_tensor(outputs["labels"]).detach().cpu())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._val_features or trainer.sanity_checking:
            self._val_features, self._val_labels = [], []
            return
        metrics = self.monitor.evaluate(trainer.global_step, torch.cat(self._val_features),
                                        torch.cat(self._val_labels))
        self._val_features, self._val_labels = [], []
        self._log(pl_module, metrics, on_step=False)

    # ---- end -------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.plot_dir or (self.monitor.logger.path.parent if self.monitor.logger is not None else None)
        if target is not None:
            self.monitor.plot(target)
        self.monitor.close()

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])

    # ---- helpers ---------------------------------------------------------------------------
    def _log(self, pl_module: pl.LightningModule, metrics: Mapping[str, Any], on_step: bool) -> None:
        values = _scalars(metrics)
        if self.log_to_lightning and values:
            pl_module.log_dict(values, on_step=on_step, on_epoch=not on_step, sync_dist=False)

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        if not self.stop_on:
            return
        fired = any(alarm.name in self.stop_on for alarm in self.monitor.alarms)
        if trainer.strategy.reduce_boolean_decision(fired, all=False):
            trainer.should_stop = True


class _SeededMixture:
    """A bare :class:`OnlineGMM` read as a prototype set: its seeded components, their weights
    and idle mask."""

    def __init__(self, mixture: OnlineGMM) -> None:
        self.mixture = mixture

    def snapshot(self) -> PrototypeSnapshot:
        m, seeded = self.mixture, self.mixture.seeded
        return PrototypeSnapshot(m.means[:seeded].detach().float().cpu(), m.weights[:seeded].detach().float().cpu(),
                                 m.idle_mask()[:seeded].detach().cpu())
