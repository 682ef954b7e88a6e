"""The training loop, read top to bottom: set-up, optional resume, k-NN of the initial
backbone, epochs of steps, checkpoints, final evaluation and ``summary.json``.

One epoch (:meth:`Trainer.train_one_epoch`)::

    for batch in batches.epoch(epoch):                     # crops, labels, indices on the device
        out = optimisation_step(model, method, optimizer, batch, step, lr, wd)
        monitor.observe(out); log every train.log_every steps; checkpoint when asked

One step (:func:`optimisation_step`)::

    lr, wd <- schedules[step]
    with autocast: out = model(batch, step)                # method forward (DDP-wrapped)
    out.loss.backward()                                    # (GradScaler with fp16)
    method.on_after_backward(step)                         # e.g. frozen prototypes
    clip gradients; optimizer.step()
    method.on_after_optimizer_step(step)                   # e.g. EMA teacher

The engine knows no method: everything it needs comes through the hooks of
:class:`~nocollapse.methods.base.SSLMethod`. Labels reach the method only when it declares
``uses_labels``. Everything that determines the future of a run is in the checkpoint: model and
mixture state, optimiser, grad scaler, step, position in the epoch, RNG states and the collapse
monitor. Data order is a function of (seed, epoch), so a resumed run continues with the same
batches.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import (HeldOutEncoder, encode_split, features_cache_path, method_report, run_summary, save_outputs,
                        write_run_plots)
from ..config import Config, ConfigError, config_from_dict, parse_overrides, to_dict, to_yaml
from ..data import Batch, TrainBatches, build_view_spec, load_dataset, steps_per_epoch
from ..data.registry import image_size_of
from ..data.semi_supervised import labelled_subset, masked_labels
from ..diagnostics.monitor import TrainingMonitor
from ..evaluation.knn import knn_accuracy
from ..evaluation.online import OnlineProbe
from ..methods import SSLMethod, build_run_method
from ..utils import distributed as dist_utils
from ..utils.checkpoint import (FORMAT, VERSION, atomic_save, load_checkpoint, prune, remove_stale_temporaries,
                                rng_state, set_rng_state)
from ..utils.oserrors import describe_os_error
from ..utils.metrics_log import MetricsLogger, read_jsonl
from ..utils.run_directory import (FAILURE_NAME, MANIFEST_NAME, RUN_ARTIFACTS, RunDirectoryError, RunLockedError,
                                   acquire_run_lock, clear_run, read_manifest, record, refuse_unless_empty,
                                   write_json_atomically, write_text_atomically)
from ..utils.optim import build_optimizer, set_hyperparameters
from ..utils.registry import METHODS
from ..utils.schedules import cosine_schedule
from ..version import __version__

log = logging.getLogger("nocollapse")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """The run was stopped (signal or ``train.stop_at_step``) after writing ``last.pt``."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only file system), or would not fit:
    the message says where, why, which checkpoint is kept and how to continue."""


@dataclass
class Position:
    epoch: int = 0          # epoch in progress
    batch: int = 0          # next batch index within the epoch
    step: int = 0           # optimisation steps done


class Throughput:
    """Training time and images per second: the time spent in epochs (kept across resumes) and
    the rate over the window since the last log step."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self._epoch_start: float | None = None
        self._window_start = time.perf_counter()
        self._window_images = 0

    def start_epoch(self) -> None:
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_images = 0

    def count(self, images: int) -> None:
        self._window_images += images

    def window_rate(self) -> float:
        """Images per second since the last call (the window restarts)."""
        now = time.perf_counter()
        rate = self._window_images / max(now - self._window_start, 1e-9)
        self._window_start, self._window_images = now, 0
        return rate

    def total(self) -> float:
        """Training seconds so far, the running epoch included."""
        running = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        return self.seconds + running

    def end_epoch(self) -> None:
        self.seconds = self.total()
        self._epoch_start = None


def _precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if p == "fp32":
        return None
    if p == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if p == "bf16" else torch.float16


def _no_buffer_sync() -> dict[str, bool]:
    """DDP must not overwrite buffers during forward: the centre and the mixture are kept equal
    on every rank by their own all-reduces, and BatchNorm statistics stay per process."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def optimisation_step(model: nn.Module, method: SSLMethod, optimizer: torch.optim.Optimizer,
                      batch: Batch | list[torch.Tensor], step: int, lr: float, weight_decay: float,
                      clip_grad: float = 0.0, scaler: torch.amp.GradScaler | None = None,
                      amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Any]:
    """One optimisation step of ``method`` (called through ``model``, its DDP wrapper or itself).

    Returns the detached loss and the method's :class:`StepOutput`, or ``None`` instead of the
    output when the loss is not finite on some process (then no parameter changed)."""
    batch = Batch.of(batch)
    set_hyperparameters(optimizer, lr, weight_decay)
    with torch.autocast(batch.crops[0].device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        out = model(batch, step)
    loss = out.loss
    finite = torch.isfinite(loss.detach()).float()
    dist_utils.all_reduce_sum(finite)  # every rank takes the same decision
    optimizer.zero_grad(set_to_none=True)
    if int(finite.item()) != dist_utils.world_size():
        method.on_skipped_step(step)
        return loss.detach(), None
    (scaler.scale(loss) if scaler is not None else loss).backward()
    method.on_after_backward(step)
    if clip_grad > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(method.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    method.on_after_optimizer_step(step)
    return loss.detach(), out


def _available_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: Config sections a resumed run may not change: they give the saved tensors their shapes and
#: meaning, or choose the images and views the run trains on.
RESUME_FIXED_SECTIONS = ("method", "model", "data", "views")
#: Keys of those sections that say where and how the same images are read, not which.
RESUME_FREE_KEYS = ("data.root", "data.download", "data.num_workers", "data.decode_cache")
#: Keys a resumed run may change with a warning: they re-cut the per-step schedules.
RESUME_WARNED_KEYS = ("train.batch_size", "train.epochs")
#: optim.* keys under which the saved optimiser state does not fit the optimiser the config builds
#: (another algorithm, other parameter groups): the optimiser then starts with empty state.
OPTIMIZER_REBUILT_KEYS = ("optim.name", "optim.decay_norms_and_biases")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every config key that differs between the run's
    checkpoint and the config it is resumed with (``config.yaml`` and ``--set``)."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(cfg))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def refused_on_resume(changes: dict[str, tuple[Any, Any]], method_name: str) -> list[str]:
    """The changed keys a resumed run refuses: every key of :data:`RESUME_FIXED_SECTIONS` but the
    :data:`RESUME_FREE_KEYS`, and the keys the method declares in ``resume_fixed_settings()``.
    Other keys of a method's own sections (temperatures, loss weights) may change; one that
    changes a tensor's shape is caught when the checkpoint is loaded into the rebuilt model."""
    fixed = METHODS.get(method_name).resume_fixed_settings()
    return [k for k in changes
            if (k.split(".", 1)[0] in RESUME_FIXED_SECTIONS and k not in RESUME_FREE_KEYS)
            or any(k == f or (f.endswith(".") and k.startswith(f)) for f in fixed)]


def _changes_text(changes: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    return ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in keys)


def _refusal(changes: dict[str, tuple[Any, Any]], refused: list[str], method_name: str, run_dir: Path) -> ConfigError:
    own = ", ".join(METHODS.get(method_name).resume_fixed_settings())
    return ConfigError(
        f"--resume cannot change {_changes_text(changes, refused)}: the run's checkpoint was trained "
        f"with the saved values, which fix the shapes of its tensors or the data it sees (method.*, "
        f"model.*, data.* and views.*{', ' + own if own else ''}). Nothing in {run_dir} was changed; to "
        f"train with the new values start a new run (another --out, or --force to replace this one)")


def check_resume_overrides(saved: dict[str, Any], overrides: list[str], run_dir: str | Path) -> None:
    """Refuse ``--set`` keys that a resumed run may not change (:func:`refused_on_resume`) by
    comparing them with the run's saved ``config.yaml``, before the new config is even built:
    the message then names the key the user changed, not a validation error that follows from
    it (``method.name=carp`` with DINO's prototype count). The trainer checks the built config
    against the checkpoint again."""
    flat = _flat(saved)
    changes = {k: (flat.get(k), v) for k, v in parse_overrides(overrides).items() if flat.get(k) != v}
    method_name = str(flat.get("method.name", ""))
    if method_name not in METHODS:
        return
    refused = refused_on_resume(changes, method_name)
    if refused:
        raise _refusal(changes, refused, method_name, Path(run_dir))


def preflight(cfg: Config, spec, world_size: int, available: int | None = None) -> None:
    """Reject settings that cannot train, before any work is done."""
    if cfg.model.backbone.startswith("vit"):
        bad = sorted({s for s in spec.crop_sizes if s % cfg.model.patch_size})
        if bad:
            raise ValueError(f"model.patch_size={cfg.model.patch_size} does not divide the crop size(s) "
                             f"{bad}; choose a patch size that divides views.global_size and views.local_size")
    rows = cfg.train.batch_size * spec.num_crops
    need = METHODS.get(cfg.method.name).estimate_state_bytes(cfg, rows)
    available = _available_memory_bytes() if available is None else available
    if available is not None and need > 0.8 * available:
        raise ValueError(
            f"method {cfg.method.name!r} with train.batch_size={cfg.train.batch_size} x {spec.num_crops} "
            f"crops needs about {need / 2**30:.1f} GiB for its state and scores, but "
            f"{available / 2**30:.1f} GiB is available; lower train.batch_size or the method's size "
            f"(e.g. method.num_prototypes)")


class Trainer:
    """Trains ``cfg`` into ``run_dir``; ``resume`` continues from ``run_dir/checkpoints/last.pt``.

    A new run needs ``run_dir`` new or empty; ``force`` trains into a directory that is not,
    after removing what an earlier run listed in its manifest (files of the user's own stay).
    The run holds the directory's lock from its first write until :meth:`fit` returns or fails."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self._lock = None
        self.dist, self.device = dist_utils.init_distributed(cfg.train.device)
        self.main = self.dist.is_main
        self._stop_requested: str | None = None

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Denormal floats (e.g. from very peaked softmaxes) slow CPU arithmetic several-fold.
        torch.set_flush_denormal(True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.ckpt_dir = self.run_dir / "checkpoints"

        # Everything that can be rejected is checked before the run directory is touched.
        self.splits = load_dataset(cfg.data)
        self.image_size = image_size_of(cfg, self.splits)
        spec = build_view_spec(cfg.views, self.image_size, self.splits.mean, self.splits.std)
        self.batches = TrainBatches(
            self.splits.ssl_train, spec, cfg.train.batch_size, cfg.train.seed, self.device,
            self.dist.rank, self.dist.world_size, cfg.views.backend, cfg.data.num_workers,
            cfg.data.bad_images)
        preflight(cfg, spec, self.dist.world_size)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.global_batch = cfg.train.batch_size * self.dist.world_size
        self.amp_dtype = _precision(cfg, self.device)
        resume_from = load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device) if self.resume else None
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
        if resume_from is not None:
            self._check_resume(resume_from)
        # Nothing is written before the model is built and the checkpoint loaded into it: a
        # resume that does not fit fails here and leaves the run directory as it was.
        self.method: SSLMethod = build_run_method(cfg, self.splits, self.image_size,
                                                  self.dist.world_size).to(self.device)
        # the labels a label-using method may see: a fixed subset (data.label_fraction), -1 elsewhere
        self.visible_labels: torch.Tensor | None = None
        if self.method.uses_labels:
            labels = self.splits.ssl_train.labels
            self.labelled = labelled_subset(labels, cfg.data.label_fraction, cfg.data.labels_per_class,
                                            cfg.data.label_seed)
            self.visible_labels = masked_labels(labels, self.labelled).to(self.device)
        if cfg.model.sync_batchnorm and self.dist.enabled:
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.model: nn.Module = self.method
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_buffer_sync())

        lr = cfg.optim.lr * (self.global_batch / 256 if cfg.optim.scale_lr else 1.0)
        self.lr_schedule = cosine_schedule(lr, cfg.optim.min_lr, self.total_steps,
                                           int(round(cfg.optim.warmup_epochs * self.steps_per_epoch)),
                                           warmup_start=cfg.optim.warmup_start_lr)
        self.wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end,
                                           self.total_steps)
        self.optimizer = build_optimizer(cfg.optim, self.method.parameter_groups(), peak_lr=lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.position = Position()
        self.skipped_steps = 0
        self.state: dict[str, Any] = {}
        if resume_from is not None:
            self._restore(resume_from)
        else:
            # Each rank draws different augmentations; rank 0 keeps the seed's stream.
            torch.manual_seed(cfg.train.seed + 1000 * self.dist.rank)
        self._take_run_directory()
        self._prepare_checkpoints()
        self._write_run_files()
        self.throughput = Throughput(float(self.state.get("train_seconds", 0.0)))
        probe = (OnlineProbe(self.splits.num_classes, bank_size=cfg.diagnostics.online_probe_bank,
                             seed=cfg.train.seed)
                 if cfg.diagnostics.online_probe else None)
        held_out = None
        if cfg.diagnostics.enabled and cfg.diagnostics.alarms and cfg.diagnostics.held_out_images:
            held_out = HeldOutEncoder.from_source(
                self.method, self.splits.train, cfg.diagnostics.held_out_images, self.image_size, self.splits,
                cfg.eval.batch_size, self.device, seed=cfg.train.seed, bad_images=cfg.data.bad_images)
        self.monitor = TrainingMonitor(cfg, self.method, self.steps_per_epoch, probe=probe, held_out=held_out)
        if "monitor" in self.state:
            self.monitor.load_state_dict(self.state["monitor"])
        self.logger = MetricsLogger(self.run_dir, enabled=self.main,
                                    resume_step=self.position.step if self.resume else None)
        self._record(*self.logger.files)

    #: what a run directory written before manifests existed holds (the fallback of ``--force``)
    RUN_ARTIFACTS = RUN_ARTIFACTS

    # ---- the run directory ---------------------------------------------------------------
    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        """Compare the config the run is resumed with against its checkpoint's, before anything
        is built or written: refuse changed keys that fix the saved tensors' shapes or the data
        (:func:`refused_on_resume`), naming them; warn when ``train.batch_size`` or
        ``train.epochs`` re-cut the cosine schedules; let ``optim.*`` and the rest change."""
        saved = config_from_dict(ckpt["config"])
        changes = resume_changes(saved, self.cfg)
        refused = refused_on_resume(changes, saved.method.name)
        if refused:
            raise _refusal(changes, refused, saved.method.name, self.run_dir)
        self._resume_changes = changes
        warned = [k for k in RESUME_WARNED_KEYS if k in changes]
        if warned and self.main:
            log.warning(self._schedule_warning(saved, ckpt, warned))

    def _schedule_warning(self, saved: Config, ckpt: dict[str, Any], warned: list[str]) -> str:
        """What a changed batch size or epoch count does to the per-step cosine schedules of the
        resumed run, with the step it continues at and the learning rate there, old and new."""
        cfg, step = self.cfg, int(ckpt.get("step", 0))
        old_world = int(ckpt.get("world_size", 1))
        old_spe = steps_per_epoch(len(self.splits.ssl_train), saved.train.batch_size, old_world)
        old_total, new_total = old_spe * saved.train.epochs, self.steps_per_epoch * cfg.train.epochs

        def lr_at(c: Config, spe: int, world: int) -> float:
            peak = c.optim.lr * (c.train.batch_size * world / 256 if c.optim.scale_lr else 1.0)
            schedule = cosine_schedule(peak, c.optim.min_lr, spe * c.train.epochs,
                                       int(round(c.optim.warmup_epochs * spe)), warmup_start=c.optim.warmup_start_lr)
            return float(schedule[min(step, len(schedule) - 1)])

        text = f"--resume changes {_changes_text(self._resume_changes, warned)}: "
        if "train.batch_size" in warned:
            text += (f"an epoch is re-cut into {self.steps_per_epoch} steps instead of {old_spe} "
                     f"(training images // (batch size x processes))")
            if int(ckpt.get("batch", 0)):
                text += (f", and the rest of epoch {int(ckpt.get('epoch', 0)) + 1} goes on from batch "
                         f"{int(ckpt['batch'])} of the new batches")
            text += "; "
        text += (f"the cosine learning-rate and weight-decay schedules, the warm-up and the method's "
                 f"per-step schedules (teacher momentum and temperature, ...) now span {new_total} steps "
                 f"instead of {old_total}, so step {step} is {100 * step / max(new_total, 1):.0f} % of the "
                 f"way through them instead of {100 * step / max(old_total, 1):.0f} % and its learning rate "
                 f"is {lr_at(cfg, self.steps_per_epoch, self.dist.world_size):.3g} instead of "
                 f"{lr_at(saved, old_spe, old_world):.3g}. The result is not the run either setting would "
                 f"have trained from the start.")
        return text

    def _take_run_directory(self) -> None:
        """Take the run directory's lock (rank 0 only, held until :meth:`fit` ends) and, for a new
        run without ``force``, check that the directory is empty. Called once everything that can
        be rejected has been, before the first write; every rank learns whether rank 0 got it."""
        error: BaseException | None = None
        if self.main:
            try:
                self._lock = acquire_run_lock(self.run_dir)
                if not (self.resume or self.force):
                    refuse_unless_empty(self.run_dir, check_lock=False)
            except (RunDirectoryError, OSError) as exc:
                error = exc
                self.release()
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist_utils.all_reduce_sum(failed)
        if error is not None:
            raise error
        if failed.item() > 0:
            raise RunLockedError(f"process 0 could not take the run directory {self.run_dir}; see its message")

    def release(self) -> None:
        """Release the run directory's lock (it is free for the next run); safe to call twice."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _record(self, *paths: str | Path) -> None:
        """List files rank 0 is about to write (or has just created) in the run's manifest, which
        is all that ``--force`` removes. A manifest that cannot be written is reported, not fatal:
        the file is then only kept by a later ``--force``."""
        if not self.main:
            return
        try:
            record(self.run_dir, *paths)
        except OSError as exc:
            log.warning("could not update %s: %s", self.run_dir / MANIFEST_NAME, describe_os_error(exc))

    def _write_run_files(self) -> None:
        """Rank 0's first writes, once every check has passed and the lock is held: a new run
        first removes what an earlier run wrote (``--force``; the directory is otherwise empty),
        then writes the resolved config, the class counts and the labelled subset."""
        if not self.main:
            return
        cfg = self.cfg
        if not self.resume:
            for path in clear_run(self.run_dir):
                log.info("--force: removed %s, written by the earlier run", path)
        elif FAILURE_NAME in (read_manifest(self.run_dir) or []):
            # the failure this run resumes from is no longer the run's state
            (self.run_dir / FAILURE_NAME).unlink(missing_ok=True)
        labelled = self.visible_labels is not None
        self._record(self.run_dir / "config.yaml", self.run_dir / "class_counts.json",
                     *([self.run_dir / "labelled_indices.json"] if labelled else []))
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.run_dir / "config.yaml", to_yaml(cfg))
        counts = self.splits.class_counts()
        write_json_atomically(self.run_dir / "class_counts.json",
                              {"classes": self.splits.class_names, "train_counts": counts,
                               "imbalance_ratio": cfg.data.imbalance_ratio})
        if labelled:
            labels = self.splits.ssl_train.labels
            per_class = torch.bincount(labels[self.labelled], minlength=self.splits.num_classes)
            write_json_atomically(self.run_dir / "labelled_indices.json",
                                  {"label_fraction": cfg.data.label_fraction,
                                   "labels_per_class": cfg.data.labels_per_class,
                                   "label_seed": cfg.data.label_seed, "count": int(self.labelled.numel()),
                                   "per_class_counts": per_class.tolist(), "indices": self.labelled.tolist()},
                                  indent=None)

    # ------------------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "nocollapse": __version__,
            "config": to_dict(self.cfg),
            "epoch": self.position.epoch, "batch": self.position.batch, "step": self.position.step,
            "world_size": self.dist.world_size,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "skipped_steps": self.skipped_steps,
            "state": {**self.state, "train_seconds": self.throughput.total(),
                      "monitor": self.monitor.state_dict()},
        }

    def save_checkpoint(self, epoch_file: bool = False) -> None:
        # RNG streams differ per rank: each rank keeps its own; rank 0 writes the model.
        rng_path = self.ckpt_dir / f"rng_rank{self.dist.rank}.pt"
        if self.dist.enabled:
            self._write_checkpoint({"format": FORMAT, "version": VERSION, "rng": rng_state()}, rng_path)
        if self.main:
            self._record(self.ckpt_dir / "last.pt",
                         *([self.ckpt_dir / f"epoch_{self.position.epoch:04d}.pt"] if epoch_file else []),
                         *(self.ckpt_dir / f"rng_rank{r}.pt" for r in range(self.dist.world_size) if self.dist.enabled))
            state = self._checkpoint_state()
            self._write_checkpoint(state, self.ckpt_dir / "last.pt")
            self._saved_step = self.position.step
            if epoch_file:
                self._write_checkpoint(state, self.ckpt_dir / f"epoch_{self.position.epoch:04d}.pt")
                prune(self.ckpt_dir, self.cfg.train.keep)
        dist_utils.barrier()

    def _write_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """``atomic_save``, with a failed write (full disk, read-only file system) turned into a
        :class:`CheckpointWriteError` that says which checkpoint is kept and how to continue."""
        try:
            atomic_save(state, path)
        except OSError as exc:
            raise CheckpointWriteError(
                f"{describe_os_error(exc, 'write checkpoint', path)}. {self._kept_checkpoint()}") from None

    def _kept_checkpoint(self) -> str:
        """What is left to resume from: ``last.pt`` and its step, or that there is none."""
        last = self.ckpt_dir / "last.pt"
        saved = getattr(self, "_saved_step", None)
        if saved is not None and last.is_file():
            return (f"The last good checkpoint, {last} (step {saved}), is kept; continue from it with: "
                    f"nocollapse train --out {self.run_dir} --resume")
        return (f"No checkpoint of this run has been written, so there is nothing to resume; start "
                f"the run again (nocollapse train --out {self.run_dir} --force ...)")

    def checkpoint_bytes(self) -> int:
        """An estimate of one checkpoint's size: the method's state (parameters and buffers) and
        the optimiser's state (two moments per trainable parameter for Adam and AdamW, one
        momentum buffer for SGD and LARS), plus a margin for the RNG, monitor and config."""
        state = sum(t.numel() * t.element_size() for t in self.method.state_dict().values()
                    if isinstance(t, torch.Tensor))
        trainable = sum(p.numel() * p.element_size() for group in self.optimizer.param_groups
                        for p in group["params"])
        name = self.cfg.optim.name
        slots = 2 if name in ("adam", "adamw") else 1 if name == "lars" or self.cfg.optim.momentum else 0
        return state + slots * trainable + 2**20

    def _prepare_checkpoints(self) -> None:
        """Before the first step: delete the temporary files that a process killed while writing
        a checkpoint left in ``checkpoints/`` (never a file of a process that still runs), and
        refuse to train when the disk cannot hold one more checkpoint (it is written next to
        the previous one before the rename), so a full disk is found now rather than after an
        epoch of training."""
        self._saved_step: int | None = self.position.step if self.resume else None
        message = ""
        if self.main:  # rank 0 writes the model's checkpoints; the other ranks only RNG states
            for path in remove_stale_temporaries(self.ckpt_dir):
                log.info("removed %s, a checkpoint write cut short by a killed process", path)
            message = self._free_space_problem()
        short = torch.tensor([1.0 if message else 0.0], device=self.device)
        dist_utils.all_reduce_sum(short)  # every rank stops together
        if short.item() > 0:
            raise CheckpointWriteError(message or "process 0 found too little free space for a checkpoint")

    def _free_space_problem(self) -> str:
        """Why the disk of ``checkpoints/`` cannot take one more checkpoint, or "". The checkpoints
        a new run replaces (``--force``) count as free."""
        need = self.checkpoint_bytes()
        where = self.ckpt_dir
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:  # no file system statistics here: the writes themselves will tell
            return ""
        if not self.resume and self.ckpt_dir.is_dir():
            free += sum(p.stat().st_size for p in self.ckpt_dir.glob("*.pt") if p.is_file())
        if free >= need:
            return ""
        return (f"not enough free space for a checkpoint in {self.ckpt_dir}: one needs about "
                f"{need / 2**20:,.1f} MiB (model and optimiser state), and {free / 2**20:,.1f} MiB is "
                f"free on that file system. Free some space or choose an --out on another disk; "
                f"nothing was trained")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint loaded (and validated) by :meth:`setup`."""
        if ckpt.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %d-process run with %d processes: the data order changes",
                        ckpt.get("world_size", 1), self.dist.world_size)
        changes = self._resume_changes
        try:
            self.method.load_state_dict(ckpt["method"])
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()
            changed = [k for k in changes if k.split(".", 1)[0] not in ("optim", "train", "eval", "diagnostics")]
            raise ConfigError(
                f"--resume: the model built from the config does not fit {self.ckpt_dir / 'last.pt'} "
                f"({detail[1].strip() if len(detail) > 1 else detail[0] if detail else exc}); "
                + (f"the changed keys are {_changes_text(changes, changed)}. Nothing in {self.run_dir} was "
                   f"changed; resume without them, or start a new run with them (another --out, or --force)"
                   if changed else f"no config key changed, so the checkpoint was written by another "
                                   f"version of the method. Nothing in {self.run_dir} was changed")) from None
        rebuilt = [k for k in OPTIMIZER_REBUILT_KEYS if k in changes]
        if rebuilt:
            log.warning("--resume changes %s: the saved optimiser state does not fit the new optimiser, "
                        "which starts with empty state (moment estimates and momentum restart)",
                        _changes_text(changes, rebuilt))
        else:
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as exc:  # other parameter groups: what the method trains changed
                raise ConfigError(
                    f"--resume: the optimiser state in {self.ckpt_dir / 'last.pt'} does not fit the parameters "
                    f"the config trains ({exc}); the changed keys are {_changes_text(changes, list(changes)) or 'none'}. "
                    f"Nothing in {self.run_dir} was changed") from None
            for group, settings in zip(self.optimizer.param_groups, configured):
                group.update(settings)  # the config's optim.* (betas, momentum, ...) win over the saved ones
        self.scaler.load_state_dict(ckpt["scaler"])
        self.position = Position(ckpt["epoch"], ckpt["batch"], ckpt["step"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.state = {k: v for k, v in ckpt.get("state", {}).items() if k != "samples_seen"}
        rng = ckpt["rng"]
        rank_file = self.ckpt_dir / f"rng_rank{self.dist.rank}.pt"
        if self.dist.enabled and rank_file.is_file():
            rng = load_checkpoint(rank_file)["rng"]
        set_rng_state(rng)
        if self.main:
            log.info("resumed from %s at epoch %d, step %d", self.ckpt_dir / "last.pt", self.position.epoch,
                     self.position.step)

    # ------------------------------------------------------------------------------------
    def encode(self, source, with_head: bool = False, max_samples: int = 0):
        return encode_split(self.method, source, self.image_size, self.splits, self.cfg.eval.batch_size,
                            self.device, self.cfg.data.num_workers, max_samples, with_head,
                            self.cfg.data.bad_images)

    def knn(self, test=None, train=None) -> dict[str, float]:
        """Weighted cosine k-NN (eval.knn_k, eval.knn_temperature) on backbone features of the
        test split, with the training split as memory bank (each encoded unless given)."""
        cfg = self.cfg
        train = train or self.encode(self.splits.train, max_samples=cfg.eval.max_train_samples)
        test = test or self.encode(self.splits.test)
        return knn_accuracy(train.features, train.labels, test.features, test.labels, k=cfg.eval.knn_k,
                            temperature=cfg.eval.knn_temperature, num_classes=self.splits.num_classes)

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_requested = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass

    def _nonfinite(self, step: int, loss: torch.Tensor) -> None:
        if self.cfg.train.nonfinite == "skip":
            self.skipped_steps += 1
            log.warning("step %d: loss is %s; step skipped (%d so far)", step, float(loss), self.skipped_steps)
            return
        lr = float(self.lr_schedule[step])
        last = self.ckpt_dir / "last.pt"
        saved = getattr(self, "_saved_step", None)
        if saved is not None and last.is_file():
            kept = (f"The last good checkpoint is {last} (step {saved}): change the config and continue "
                    f"with --resume, or set train.nonfinite=skip.")
        else:
            kept = ("No checkpoint was written before this step, so there is nothing to resume: change "
                    "the config (or set train.nonfinite=skip) and start the run again with --force.")
        message = (f"the loss became {float(loss)} at step {step} (epoch {self.position.epoch}, lr {lr:.3g}). "
                   f"Likely causes: a learning rate too high for this batch size, a teacher temperature "
                   f"too low, or fp16 overflow. {kept}")
        self._write_failure({"reason": "non_finite_loss", "step": step, "epoch": self.position.epoch,
                             "lr": lr, "loss": str(float(loss)), "last_checkpoint_step": saved,
                             "message": message})
        raise NonFiniteLossError(message)

    def _write_failure(self, failure: dict[str, Any]) -> None:
        """Rank 0 writes ``failure.json``: why the run stopped before its end, for the user and for
        tools that read run directories (a study records a diverged run from it rather than
        losing it). A failed write is reported, not fatal: the error itself is still raised."""
        if not self.main:
            return
        path = self.run_dir / FAILURE_NAME
        self._record(path)
        try:
            write_json_atomically(path, {"nocollapse_version": __version__, **failure})
        except OSError as exc:
            log.warning("could not write %s: %s", path, describe_os_error(exc))

    # ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Set up, train to ``train.epochs`` and evaluate; returns the summary. The run
        directory's lock is released however this ends: normally, on an error, on Ctrl-C, or
        on SIGTERM (which stops the run with :class:`TrainingInterrupted`)."""
        try:
            return self._fit()
        finally:
            self.release()

    def _fit(self) -> dict[str, Any]:
        self.setup()
        cfg = self.cfg
        if cfg.eval.knn_init and "knn_init" not in self.state:
            self.state["knn_init"] = self.knn()
            self.logger.log({"step": 0, "epoch": 0.0, "knn_top1": self.state["knn_init"]["top1"],
                             "knn_top5": self.state["knn_init"]["top5"]}, prefix="epoch")
        if self.main:
            log.info("training %s on %s: %d steps/epoch x %d epochs, %s trainable params, device %s, "
                     "%d process(es)", self.method.describe(), cfg.data.dataset, self.steps_per_epoch,
                     cfg.train.epochs, f"{self.method.trainable_parameter_count():,}", self.device,
                     self.dist.world_size)
        self._install_signal_handlers()
        self.model.train()
        try:
            while self.position.epoch < cfg.train.epochs:
                self.train_one_epoch()
                self._end_of_epoch()
            return self._finish()
        finally:
            self.logger.close()

    def labels_for_method(self, batch: Batch) -> Batch:
        """No labels for a method that does not use them; the labelled subset's for one that does
        (-1 for every other sample, and for an unreadable image replaced by another)."""
        if self.visible_labels is None:
            return batch.without_labels()
        known = self.visible_labels[batch.indices]
        return replace(batch, labels=torch.where(batch.labels >= 0, known, torch.full_like(known, -1)))

    def train_one_epoch(self) -> None:
        cfg, epoch = self.cfg, self.position.epoch
        progress = self._progress_bar(epoch)
        self.throughput.start_epoch()
        try:
            for batch in self.batches.epoch(epoch, self.position.batch):
                all_labels = batch.labels                  # for the online probe only, never the method
                batch = self.labels_for_method(batch)
                step = self.position.step
                loss, out = optimisation_step(
                    self.model, self.method, self.optimizer, batch, step, float(self.lr_schedule[step]),
                    float(self.wd_schedule[step]), cfg.optim.clip_grad, self.scaler, self.amp_dtype)
                if out is None:
                    self._nonfinite(step, loss)
                else:
                    self.monitor.observe(out, all_labels)
                self.position.step += 1
                self.position.batch += 1
                self.throughput.count(self.global_batch)
                if progress is not None:
                    progress.update(1)
                if self.position.step % cfg.train.log_every == 0 or self.position.batch == self.steps_per_epoch:
                    self._log_step(step, loss, out, progress)
                if self._should_interrupt():
                    self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped at step {self.position.step} ({self._stop_requested}); "
                        f"continue with: nocollapse train --out {self.run_dir} --resume")
                if cfg.train.checkpoint_every_steps and self.position.step % cfg.train.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                # the step's outputs (B x K targets and logits among them) go before the next step
                # runs, not after it
                del out
        finally:
            if progress is not None:
                progress.close()
        self.throughput.end_epoch()
        self.position.epoch += 1
        self.position.batch = 0

    def _progress_bar(self, epoch: int):
        if not (self.main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.position.batch,
                    desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False, dynamic_ncols=True,
                    file=sys.stderr)

    def _log_step(self, step: int, loss: torch.Tensor, out, progress) -> None:
        self.monitor.check_skipped_steps(self.position.step, self.skipped_steps)
        rate = self.throughput.window_rate()
        record = {"step": self.position.step, "epoch": self.position.epoch + self.position.batch / self.steps_per_epoch,
                  "loss": float(loss), "lr": float(self.lr_schedule[step]),
                  "weight_decay": float(self.wd_schedule[step]), "samples_per_second": rate}
        if out is not None:
            record.update(out.logs)
            record.update(self.monitor.step_metrics(self.position.step, float(loss), out))
        self.logger.log(record)
        if progress is not None:
            progress.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{rate:.0f}")

    def _should_interrupt(self) -> bool:
        stop_at = self.cfg.train.stop_at_step
        if stop_at and self.position.step == stop_at:  # once: a resumed run has moved past it
            self._stop_requested = self._stop_requested or f"train.stop_at_step={stop_at}"
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        dist_utils.all_reduce_sum(flag)
        if flag.item() > 0 and not self._stop_requested:
            self._stop_requested = "another process was stopped"
        return bool(flag.item() > 0)

    def _end_of_epoch(self) -> None:
        cfg = self.cfg
        epoch = self.position.epoch
        record: dict[str, Any] = {"step": self.position.step, "epoch": float(epoch)}
        record.update(self.monitor.epoch_metrics(self.position.step, self.method))
        if cfg.eval.knn_every and epoch % cfg.eval.knn_every == 0 and epoch < cfg.train.epochs:
            knn = self.knn()
            record.update(knn_top1=knn["top1"], knn_top5=knn["top5"])
            self.state.setdefault("knn_history", []).append({"epoch": epoch, **knn})
        if len(record) > 2:
            self.logger.log(record, prefix="epoch")
        every = cfg.train.checkpoint_every
        self.save_checkpoint(epoch_file=bool(every) and (epoch % every == 0 or epoch == cfg.train.epochs))

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        train = self.encode(self.splits.train, max_samples=cfg.eval.max_train_samples)
        test = self.encode(self.splits.test, with_head=True)
        knn = self.knn(test, train)
        last = self.ckpt_dir / "last.pt"
        if self.main and cfg.eval.save_features and not cfg.eval.max_train_samples and last.is_file():
            # the outputs `nocollapse eval` would encode from last.pt, which holds these weights
            features = features_cache_path(self.run_dir, last, self.position.step)
            self._record(features)
            save_outputs(features, last, train, test)
        report = method_report(self.method, test)
        self.logger.log({"step": self.position.step, "epoch": float(self.position.epoch),
                         "knn_top1": knn["top1"], "knn_top5": knn["top5"]}, prefix="epoch")
        self.monitor.check_skipped_steps(self.position.step, self.skipped_steps, final=True)
        skipped = [*self.splits.ssl_train.skipped, *self.splits.test.skipped]
        if self.splits.train is not self.splits.ssl_train:
            skipped += self.splits.train.skipped
        summary = run_summary(
            cfg, self.method, steps=self.position.step, processes=self.dist.world_size, device=self.device,
            train_seconds=self.throughput.seconds, knn=knn, knn_init=self.state.get("knn_init"),
            report=report, alarms=self.monitor.alarms, splits=self.splits, skipped_images=skipped,
            substituted=self.batches.substituted, skipped_steps=self.skipped_steps)
        if self.main:
            self._record(self.run_dir / "summary.json", self.run_dir / "diagnosis.json")
            write_json_atomically(self.run_dir / "summary.json", summary, indent=2)
            write_json_atomically(self.run_dir / "diagnosis.json", report)
            if cfg.diagnostics.plots:
                self._record(*write_run_plots(self.run_dir, self.method, report,
                                              read_jsonl(self.run_dir / "metrics.jsonl"), label=self.method.describe()))
        return summary


__all__ = ["CheckpointWriteError", "NonFiniteLossError", "Throughput", "Trainer", "TrainingInterrupted",
           "optimisation_step"]
