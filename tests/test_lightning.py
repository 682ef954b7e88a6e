"""The Lightning callback feeds the collapse monitor from a LightningModule: step outputs,
epoch prototypes (a matrix or a mixture), the online probe, stopping on an alarm, checkpoint
state, clear errors, and the Lightning example end to end (skipped without the extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch",
                         reason="the Lightning callback needs the extra: pip install 'nocollapse[lightning]'")

from nocollapse import DecoupledPrototypes, OnlineProbe  # noqa: E402
from nocollapse.integrations.lightning import CollapseMonitorCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Tiny(pl.LightningModule):
    """Assignments of 8 prototypes; ``collapsed`` puts every sample on prototype 0."""

    def __init__(self, collapsed: bool = False, mixture: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.collapsed = collapsed
        self.mixture = DecoupledPrototypes(8, 4, beta0=1.0) if mixture else None
        self.prototypes = nn.Parameter(F.normalize(torch.randn(8, 4), dim=1))

    def collapse_prototypes(self):
        return self.mixture if self.mixture is not None else self.prototypes

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = F.normalize(self.encoder(x), dim=1)
        if self.mixture is not None:
            probs = self.mixture.update(z.detach(), self.global_step)
            self.mixture.commit()
        elif self.collapsed:
            probs = F.one_hot(torch.zeros(len(x), dtype=torch.long), 8).float()
        else:
            probs = F.softmax(z @ self.prototypes.t() / 0.1, dim=1)
        loss = (z - x[:, :4]).pow(2).mean()
        return {"loss": loss, "probs": probs, "embeddings": z.detach(), "features": x, "labels": y}

    def validation_step(self, batch, batch_idx):
        return {"features": batch[0], "labels": batch[1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), lr=0.1)


def _loader(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.eye(3, 6)[y] + 0.1 * torch.randn(n, 6, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(tmp_path, callback, epochs=3, **kwargs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)


def test_step_outputs_and_epoch_prototypes_reach_the_monitor(tmp_path):
    callback = CollapseMonitorCallback(warmup_steps=0, log_dir=tmp_path, probe=OnlineProbe(3, bank_size=64))
    _trainer(tmp_path, callback).fit(Tiny(), _loader(), _loader(seed=1))
    monitor = callback.monitor
    assert monitor.updates == 3 * 4 and monitor.epoch == 3          # one update per step, one epoch end each
    epochs = [r for r in monitor.records if "unique_0.1" in r]
    assert len(epochs) == 3 and epochs[-1]["step"] == 12
    assert epochs[-1]["online_knn_top1"] > 0.9                       # the labels fed the probe
    assert any("val_online_knn_top1" in r for r in monitor.records)  # validation_step's features
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "training_curves.png").exists()


def test_a_mixture_gives_weights_and_idle_components(tmp_path):
    callback = CollapseMonitorCallback(warmup_steps=0, alarms=False, log_dir=tmp_path)
    _trainer(tmp_path, callback, epochs=1).fit(Tiny(mixture=True), _loader())
    epoch = [r for r in callback.monitor.records if "unique_0.1" in r][-1]
    assert {"mixture_perplexity", "mixture_dead"} <= set(epoch)
    assert 1.0 <= epoch["mixture_perplexity"] <= 8.0


def test_an_alarm_in_stop_on_stops_training_and_is_checkpointed(tmp_path):
    callback = CollapseMonitorCallback(warmup_steps=0, patience=2, stop_on=("one_hot_collapse",))
    trainer = _trainer(tmp_path, callback, epochs=20)
    trainer.fit(Tiny(collapsed=True), _loader())
    assert [a.name for a in callback.monitor.alarms][:1] == ["one_hot_collapse"]
    assert trainer.global_step < 20 * 4                              # stopped long before max_epochs
    ckpt = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = CollapseMonitorCallback(warmup_steps=0, patience=2)
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    fresh.load_state_dict(next(iter(state.values())))
    assert [a.name for a in fresh.monitor.alarms] == [a.name for a in callback.monitor.alarms]
    assert fresh.monitor.updates == callback.monitor.updates


def test_a_healthy_module_raises_nothing_and_does_not_stop(tmp_path):
    callback = CollapseMonitorCallback(warmup_steps=0, stop_on=("one_hot_collapse",))
    trainer = _trainer(tmp_path, callback, epochs=2)
    trainer.fit(Tiny(), _loader())
    assert trainer.global_step == 2 * 4 and "one_hot_collapse" not in [a.name for a in callback.monitor.alarms]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown alarm names"):
        CollapseMonitorCallback(stop_on=("collapsed",))
    from nocollapse import CollapseMonitor
    with pytest.raises(ValueError, match="either a monitor or its options"):
        CollapseMonitorCallback(CollapseMonitor(), warmup_steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("collapse", [pytest.param(False, marks=pytest.mark.long), True])
def test_lightning_example_runs_and_the_collapsed_run_stops(tmp_path, collapse):
    command = [sys.executable, str(ROOT / "examples" / "lightning_swav.py"), "--out", str(tmp_path), "--epochs", "8"]
    if collapse:
        command += ["--collapse", "--stop"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if collapse:
        assert "one_hot_collapse" in result["alarms"] and result["global_step"] < 8 * 11
    else:
        assert result["alarms"] == [] and result["global_step"] == 8 * 11
        assert result["last_epoch"]["online_knn_top1"] > 0.5
    assert (tmp_path / "metrics.jsonl").exists()
    assert "collapse/unique_0.1" in (tmp_path / "lightning" / "version_0" / "metrics.csv").read_text()


def test_a_ckpt_path_resume_keeps_the_monitors_history(tmp_path):
    """Resume from an epoch-1 checkpoint after a run that went on to epoch 3: metrics.jsonl keeps
    the records up to the checkpoint's step, drops those after it, and the resumed epochs follow."""
    log_dir = tmp_path / "collapse"
    first = CollapseMonitorCallback(warmup_steps=0, alarms=False, log_dir=log_dir)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                               filename="{epoch}")
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, callbacks=[first, checkpoints], logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(Tiny(), _loader())
    steps_before = [r["step"] for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())]
    assert max(steps_before) == 12

    second = CollapseMonitorCallback(warmup_steps=0, alarms=False, log_dir=log_dir)
    resumed = _trainer(tmp_path, second, epochs=3)
    resumed.fit(Tiny(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    # epoch 0 (its 4 steps and its end) survived the restore; epochs 1-2 were logged again, once
    assert steps[:5] == steps_before[:5] and min(steps) == min(steps_before)
    assert steps.count(12) == 2 and max(steps) == 12                 # one step record, one epoch record
    assert len(steps) == len(steps_before)
