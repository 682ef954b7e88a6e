"""Faults and bad input: atomic checkpoints, non-finite losses, kill-and-resume, corrupt images,
settings that cannot train, damaged or foreign checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nocollapse.cli import main
from nocollapse.utils import checkpoint as ckpt_mod
from nocollapse.utils.checkpoint import CheckpointError, atomic_save, epoch_checkpoints, load_checkpoint, prune
from nocollapse.utils.run_directory import read_manifest
from nocollapse.methods.dino import DINO

from conftest import TINY

pytestmark = pytest.mark.slow


# ---- atomic checkpoints --------------------------------------------------------------------

def test_crash_during_a_checkpoint_write_leaves_the_previous_file_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": ckpt_mod.FORMAT, "version": 1, "step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crashing_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04partial")  # a few bytes hit the disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": ckpt_mod.FORMAT, "version": 1, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind


def test_prune_keeps_the_newest_epoch_checkpoints(tmp_path):
    for e in (1, 2, 3, 10):
        atomic_save({"e": e}, tmp_path / f"epoch_{e:04d}.pt")
    (tmp_path / "last.pt").write_bytes(b"x")
    removed = prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["epoch_0001.pt", "epoch_0002.pt"]
    assert [p.name for p in epoch_checkpoints(tmp_path)] == ["epoch_0003.pt", "epoch_0010.pt"]
    assert (tmp_path / "last.pt").exists()


def test_damaged_and_foreign_checkpoints_are_rejected_clearly(tmp_path):
    damaged = tmp_path / "damaged.pt"
    atomic_save({"format": ckpt_mod.FORMAT, "version": 1, "w": torch.ones(1000)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:300])   # truncated
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a nocollapse checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ckpt_mod.FORMAT, "obj": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(pickled)


def test_resume_from_a_damaged_last_checkpoint_fails_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *TINY, "train.epochs=1"]) == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "damaged" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}


# ---- non-finite losses ---------------------------------------------------------------------

@pytest.fixture
def nan_from_step(monkeypatch):
    def install(first_bad: int, last_bad: int | None = None):
        original = DINO.forward

        def forward(self, crops, step):
            out = original(self, crops, step)
            if step >= first_bad and (last_bad is None or step <= last_bad):
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(DINO, "forward", forward)
        return lambda: monkeypatch.setattr(DINO, "forward", original)   # heal the loss again
    return install


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_from_step, capsys):
    nan_from_step(5)
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", *TINY, "train.checkpoint_every_steps=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "step 5" in err and "learning rate" in err and "last.pt" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert not (out / "summary.json").exists()
    # the run directory says why it stopped, for the user and for tools that collect runs
    failure = json.loads((out / "failure.json").read_text())
    assert failure["reason"] == "non_finite_loss" and failure["step"] == 5 and failure["loss"] == "nan"
    assert failure["last_checkpoint_step"] == 4 and "step 5" in failure["message"]
    assert "failure.json" in read_manifest(out)


def test_a_resumed_run_that_finishes_drops_the_failure_it_resumed_from(tmp_path, nan_from_step):
    out = tmp_path / "run"
    heal = nan_from_step(5, 5)
    assert main(["train", "--out", str(out), "--set", *TINY, "train.checkpoint_every_steps=2"]) == 2
    assert (out / "failure.json").is_file()
    heal()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert (out / "summary.json").is_file() and not (out / "failure.json").exists()


def test_nonfinite_loss_can_be_skipped_with_a_counter(tmp_path, nan_from_step):
    nan_from_step(3, 5)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *TINY, "train.nonfinite=skip"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3


# ---- kill and resume -------------------------------------------------------------------------

def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nocollapse.cli", "train", "--out", str(out), "--set", *TINY,
            "train.epochs=3", "train.deterministic=true", "train.checkpoint_every_steps=5",
            # the test compares weights only: no plots, no k-NN of the random init, a one-epoch probe
            "diagnostics.plots=false", "eval.knn_init=false", "eval.linear_epochs=1", "eval.save_features=false",
            *extra]


def _wait_for_step(out: Path, step: int, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(l).get("step", 0) >= step and "loss" in l
                                     for l in metrics.read_text().splitlines() if l.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.long)])
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_command(full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(killed, 12, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 3          # stopped cleanly after writing last.pt
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "checkpoints" / "last.pt")["step"]
    assert 0 < stopped_at < 63
    resumed = subprocess.run([sys.executable, "-m", "nocollapse.cli", "train", "--out", str(killed),
                              "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 63
    for key, value in a["method"].items():
        assert torch.allclose(value.float(), b["method"][key].float(), atol=1e-6), key


# ---- bad input -------------------------------------------------------------------------------

def _image_folder(root: Path, per_class: int = 40, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


FOLDER = ["data.dataset=imagefolder", "model.width_multiplier=0.125", "method.num_prototypes=16",
          "method.head.hidden_dim=32", "method.head.bottleneck_dim=8", "train.epochs=1",
          "train.batch_size=16", "train.progress=false", "train.threads=1"]


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_corrupt_jpeg_is_skipped_with_a_counted_warning_naming_the_file(tmp_path, caplog, in_memory):
    _image_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "b" / "7.jpg"
    bad.write_bytes(bad.read_bytes()[:60])     # truncated JPEG
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", *FOLDER, f"data.root={tmp_path / 'data'}",
                 f"data.in_memory={in_memory}", "views.global_size=16"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"]["count"] >= 1
    if in_memory == "true":
        assert summary["skipped_images"]["files"] == [str(bad)]
    assert "7.jpg" in caplog.text


def test_corrupt_jpeg_fails_by_config(tmp_path, capsys):
    _image_folder(tmp_path / "data")
    bad = tmp_path / "data" / "test" / "a" / "3.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    code = main(["train", "--out", str(tmp_path / "run"), "--set", *FOLDER,
                 f"data.root={tmp_path / 'data'}", "data.bad_images=fail"])
    assert code == 2
    assert "3.jpg" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["views.global_size=32"], "larger than the images"),
    (["views.local_crops=2", "views.local_size=20"], "local_size"),
    (["train.batch_size=2000"], "larger than the training set"),
    (["model.backbone=vit_tiny", "model.patch_size=3"], "patch"),
    (["method.num_prototypes=4000000", "method.head.bottleneck_dim=4096"], "GiB"),
    (["carp.block_size=16"], "only apply when method.name is 'carp'"),
    (["method.name=carp", "carp.block_size=24"], "must divide"),
    (["train.precision=fp16"], "CUDA"),
    (["method.prototypes=decoupled", "method.koleo_weight=0.5"], "koleo"),
])
def test_settings_that_cannot_train_are_rejected_before_anything_is_written(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", *TINY, "data.image_size=16", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
