"""Fault injection: every OSError a sentence, images that decode correctly or are refused, damaged
caches rebuilt, and messages that tell the truth (issue 34, items 4 to 7).

A full disk is simulated by a file whose writes fail with ENOSPC part-way (a tmpfs is not
available everywhere), a read-only directory by ``chmod`` or, as root (whom ``chmod`` does not
stop), by writes that fail with EACCES. The tests that train are marked ``slow``; each trains
the tiny digits configuration for one or two epochs."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nocollapse.cli import bundled_config_names, main
from nocollapse.config import DataConfig
from nocollapse.data import load_dataset
from nocollapse.data import registry
from nocollapse.data.sources import BadImageError, decode_files, decode_image
from nocollapse.diagnostics.alarms import AlarmMonitor
from nocollapse.methods.carp import CARP
from nocollapse.methods.dino import DINO
from nocollapse.utils import checkpoint as ckpt_mod
from nocollapse.utils.checkpoint import (FORMAT, atomic_save, describe_unreadable, load_checkpoint,
                                         remove_stale_temporaries)
from nocollapse.utils.oserrors import describe_os_error

from conftest import TINY

# a tiny run without the parts that do not matter here (plots, the k-NN of the initial weights)
QUICK = [*TINY, "diagnostics.plots=false", "eval.knn_init=false"]
UNSAFE_ADVICE = "weights_only=False"


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(root: Path, classes=("a", "b"), per_class: int = 4, size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i + 1:04d}.png", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# ---- item 4: every OSError is a sentence -----------------------------------------------------

def test_os_errors_read_as_a_sentence_with_the_path_the_errno_and_a_remedy():
    full = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/r/checkpoints/last.pt"),
                             "write checkpoint", "/r/checkpoints/last.pt")
    assert full.startswith("cannot write checkpoint /r/checkpoints/last.pt: no space left on device (ENOSPC)")
    assert "free some space" in full
    denied = describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/r/run.lock"))
    assert "/r/run.lock" in denied and "EACCES" in denied and "not writable" in denied
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/r"))


class _FullDiskFile:
    """A file opened for writing whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, path, room: int) -> None:
        self.fh = builtins.open(path, "wb")
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.fh.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _fill_disk_at(monkeypatch, name_prefix: str, nth: int = 1, room: int = 4096) -> None:
    """From the ``nth`` write on, files written by ``atomic_save`` whose temporary name starts
    with ``name_prefix`` hit a full disk after ``room`` bytes."""
    seen = {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).name.startswith(name_prefix):
            seen["n"] += 1
            if seen["n"] >= nth:
                return _FullDiskFile(path, room)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "open", fake_open, raising=False)


def test_a_full_disk_during_a_checkpoint_write_raises_enospc_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": FORMAT, "version": 1, "step": 1}, path)
    _fill_disk_at(monkeypatch, ".last.pt.tmp")
    # torch's writer turns the failed write into "RuntimeError: [enforce fail at inline_container.cc]"
    with pytest.raises(OSError) as info:
        atomic_save({"format": FORMAT, "version": 1, "step": 2, "w": torch.ones(100_000)}, path)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, RuntimeError)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), "--set", *QUICK])
    assert "is a file, not a directory" in str(info.value)
    assert out.read_text() == "mine"


def test_an_out_below_a_file_is_a_sentence(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["train", "--out", str(tmp_path / "file" / "run"), "--set", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    assert "not a directory (ENOTDIR)" in err and str(tmp_path / "file") in err
    assert "Traceback" not in err


def _make_read_only(monkeypatch, root: Path) -> None:
    """``root`` (an existing directory) read-only: ``chmod`` where it stops this user, else (as
    root, whom permissions do not stop) every write below ``root`` fails with EACCES."""
    root.chmod(0o555)
    if os.geteuid() != 0:
        return

    def denied(path) -> OSError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def below(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root.resolve())
        except (TypeError, ValueError):
            return False

    real_os_open, real_open, real_mkdir = os.open, builtins.open, pathlib.Path.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and below(path):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and below(file):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if below(self) and not self.exists():
            raise denied(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_a_read_only_out_is_a_sentence_naming_the_path(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    _make_read_only(monkeypatch, out)
    try:
        code = main(["train", "--out", str(out), "--set", *QUICK])
    finally:
        monkeypatch.undo()
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2
    assert str(out) in err and "permission denied (EACCES)" in err and "not writable" in err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_free_space_for_one_checkpoint_is_checked_before_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    code = main(["train", "--out", str(out), "--set", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    assert "not enough free space for a checkpoint" in err and "MiB" in err and "nothing was trained" in err
    assert not (out / "checkpoints" / "last.pt").exists() and not (out / "summary.json").exists()
    assert not any("loss" in r for r in map(json.loads, _lines(out / "metrics.jsonl")))


def _lines(path: Path) -> list[str]:
    return [l for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


@pytest.mark.slow
def test_the_checkpoint_size_estimate_covers_a_written_checkpoint(tmp_path):
    from nocollapse.config import build_config
    from nocollapse.engine.trainer import Trainer

    for optimiser in ("adamw", "sgd"):
        cfg, _ = build_config(overrides=[*QUICK, f"optim.name={optimiser}"])
        trainer = Trainer(cfg, tmp_path / optimiser)
        try:
            trainer.setup()
            trainer.optimizer.zero_grad()
            for p in trainer.method.parameters():   # one step, so that the optimiser has its state
                p.grad = torch.zeros_like(p) if p.requires_grad else None
            trainer.optimizer.step()
            trainer.save_checkpoint()
        finally:
            trainer.release()
        size = (tmp_path / optimiser / "checkpoints" / "last.pt").stat().st_size
        assert size <= trainer.checkpoint_bytes() <= 2 * size + 2**20, optimiser


@pytest.mark.slow
def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fill_disk_at(monkeypatch, ".last.pt.tmp", nth=2)        # the end of epoch 2 hits a full disk
    code = main(["train", "--out", str(out), "--set", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    last = out / "checkpoints" / "last.pt"
    assert f"cannot write checkpoint {last}: no space left on device (ENOSPC)" in err
    assert "(step 21), is kept" in err and f"nocollapse train --out {out} --resume" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert load_checkpoint(last)["step"] == 21
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]       # no temporary left

    monkeypatch.undo()                                        # space freed
    stale = [last.parent / f".last.pt.tmp-{_dead_pid()}" for _ in range(16)]   # 16 kills mid-write
    for p in stale:
        p.write_bytes(b"PK\x03\x04 cut short")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(last)["step"] == 42
    assert json.loads((out / "summary.json").read_text())["steps"] == 42
    assert not any(p.exists() for p in stale)


def test_stale_temporaries_go_and_those_of_live_processes_stay(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = tmp_path / f".last.pt.tmp-{_dead_pid()}"
        alive = tmp_path / f".last.pt.tmp-{live.pid}"
        mine = tmp_path / f".epoch_0003.pt.tmp-{os.getpid()}"
        other = tmp_path / "notes.tmp-1"
        for p in (dead, alive, mine, other):
            p.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == [dead]
        assert alive.exists() and mine.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


# ---- item 5: images decode correctly or are refused ------------------------------------------

def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    decoded = np.asarray(decode_image(tmp_path / "deep.png"))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert decoded.dtype == np.uint8 and decoded.shape == (8, 64, 3)
    assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 1
    assert decoded.min() == 0 and decoded.max() == 255 and 120 < decoded.mean() < 135   # not all white
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "wide.tif")                  # mode I
    assert np.abs(np.asarray(decode_image(tmp_path / "wide.tif"))[..., 0].astype(int) - expected).max() <= 1


def test_a_floating_point_image_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImageError, match=r"float\.tif.*mode F"):
        decode_image(tmp_path / "float.tif")


@pytest.mark.parametrize("first", ["empty", "garbage"])
def test_an_unreadable_first_file_is_skipped_not_fatal(tmp_path, caplog, first):
    _folder(tmp_path)
    bad = tmp_path / "train" / "a" / "0000.png"          # sorts first in the split
    bad.write_bytes(b"" if first == "empty" else b"\x89PNG not really")
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), decode_cache="off"))
    assert splits.train.skipped == [str(bad)] and len(splits.train) == 8
    assert "0000.png" in caplog.text
    with pytest.raises(BadImageError, match="0000.png"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), bad_images="fail", decode_cache="off"))


def test_a_huge_first_image_does_not_size_the_split(tmp_path):
    _folder(tmp_path, per_class=40)
    # 81 images at 5000 px would need 6 GiB: the split would be read from files
    _png(tmp_path / "train" / "a" / "0000.png", np.zeros((5000, 5000), dtype=np.uint8))
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), decode_cache="off"))
    assert splits.train.images.shape == (81, 3, 12, 12)                       # decoded into memory
    assert registry._sampled_side([str(tmp_path / "train" / "a" / "0000.png")], "skip") == 5000


# ---- item 6: damaged caches are rebuilt ------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One finished tiny run (one epoch), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(out), "--set", *QUICK, "train.epochs=1"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "foreign tensor"])
def test_a_damaged_feature_cache_is_rebuilt_with_a_warning(trained_run, tmp_path, caplog, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (cache,) = (run / "features").glob("*.pt")
    reference = torch.load(cache, weights_only=True)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:500])
    elif damage == "random bytes":
        cache.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save(torch.ones(3), cache)
    caplog.set_level(logging.WARNING)
    assert main(["eval", str(run), "--knn"]) == 0
    assert "ignoring unreadable feature cache" in caplog.text and cache.name in caplog.text
    assert UNSAFE_ADVICE not in caplog.text + capsys.readouterr().err
    rebuilt = torch.load(cache, weights_only=True)                               # re-encoded and written
    assert torch.allclose(rebuilt["test"]["features"], reference["test"]["features"], atol=1e-5)


def test_a_random_bytes_decoded_image_cache_is_decoded_again_without_unsafe_advice(tmp_path, caplog):
    _folder(tmp_path / "data")
    paths = sorted(str(p) for p in (tmp_path / "data" / "train").rglob("*.png"))
    labels = [0] * len(paths)
    first = decode_files(paths, labels, None, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(np.random.default_rng(1).bytes(2048))
    assert torch.equal(decode_files(paths, labels, None, cache_dir=tmp_path / "cache").images, first.images)
    assert "not a PyTorch checkpoint" in caplog.text and UNSAFE_ADVICE not in caplog.text


# ---- item 7: messages that tell the truth ----------------------------------------------------

@pytest.fixture
def nan_loss(monkeypatch):
    """The loss of DINO's steps ``first`` to ``last`` (inclusive) becomes NaN."""
    def install(first: int, last: int | None = None) -> None:
        original = DINO.forward

        def forward(self, batch, step):
            out = original(self, batch, step)
            if step >= first and (last is None or step <= last):
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(DINO, "forward", forward)
    return install


@pytest.mark.slow
def test_a_nonfinite_stop_before_any_checkpoint_says_there_is_none(tmp_path, nan_loss, capsys):
    nan_loss(3)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "step 3" in err and "No checkpoint was written before this step" in err
    assert "last.pt" not in err and "--resume" not in err
    assert not (out / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_skipped_steps_are_printed_and_most_skipped_raises_an_alarm(tmp_path, nan_loss, capsys, caplog):
    nan_loss(0, 15)                                     # 16 of the 21 steps of one epoch
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *QUICK, "train.epochs=1", "train.nonfinite=skip"]) == 0
    printed = capsys.readouterr()
    assert "skipped steps" in printed.out and "16 of 21 (76%)" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 16
    (alarm,) = [a for a in summary["alarms"] if a["name"] == "skipped_steps"]
    assert "16 of 21 steps" in alarm["message"] and alarm["remedy"] and alarm["cause"]
    assert "ALARM skipped_steps" in caplog.text


def test_the_skipped_steps_alarm_fires_when_most_steps_are_skipped():
    mon = AlarmMonitor(warmup_steps=0, patience=1, enabled=("skipped_steps",))
    assert mon.update(20, {"skipped_steps": 10, "steps": 20}) == []             # half is not most
    assert mon.update(21, {"skipped_steps": 0}) == []                           # no step count: no check
    (alarm,) = mon.update(22, {"skipped_steps": 12, "steps": 22})
    assert alarm.name == "skipped_steps" and "12 of 22 steps (55%)" in alarm.message
    assert "learning rate" in alarm.cause and "optim.lr" in alarm.remedy
    assert mon.update(30, {"skipped_steps": 30, "steps": 30}) == []             # once


def test_the_trainer_checks_skipped_steps_after_the_warmup_and_at_the_end():
    from nocollapse.config import Config
    from nocollapse.diagnostics.monitor import TrainingMonitor

    class Method:
        num_prototypes, embedding_dim, fixed_prototypes = 8, 4, False

        def uniform_loss(self):
            return None

    mon = TrainingMonitor(Config(), Method(), steps_per_epoch=100)
    mon.check_skipped_steps(10, 10)                        # in the warm-up (one epoch)
    assert mon.alarms == []
    mon.check_skipped_steps(10, 10, final=True)            # a run that ends early is still checked
    assert [a.name for a in mon.alarms] == ["skipped_steps"]
    restored = TrainingMonitor(Config(), Method(), steps_per_epoch=100)
    restored.load_state_dict(json.loads(json.dumps(mon.state_dict(), default=lambda t: t.tolist()))
                             | {"argmax_counts": torch.zeros(8, dtype=torch.long)})
    assert [a.name for a in restored.alarms] == ["skipped_steps"]


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=.inf", "optim.weight_decay=-.inf",
                                      "eval.linear_lrs=[0.001, .nan]"])
def test_nonfinite_numbers_are_rejected_before_the_run_directory_is_touched(tmp_path, capsys, override):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *QUICK, override]) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "finite" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [["eval"], ["diagnose"], ["diagnose", "--key", "w", "--weights"]])
def test_a_random_bytes_file_is_not_a_pytorch_checkpoint(tmp_path, capsys, command):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(2).bytes(4096))
    assert main([*command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a PyTorch checkpoint" in err
    assert UNSAFE_ADVICE not in err and "weights_only" not in err


def test_unloadable_files_are_described_without_unsafe_advice(tmp_path):
    cases = {"empty": b"", "text": b"hello"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"p": pathlib.PurePosixPath("x")}, tmp_path / "objects")
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole")
    (tmp_path / "truncated").write_bytes((tmp_path / "whole").read_bytes()[:300])
    reasons = {}
    for name in ("empty", "text", "objects", "truncated"):
        with pytest.raises(Exception) as info:
            torch.load(tmp_path / name, weights_only=True)
        reasons[name] = describe_unreadable(tmp_path / name, info.value)
    assert reasons["empty"].startswith("is empty")
    assert reasons["text"].startswith("is not a PyTorch checkpoint")
    assert reasons["objects"].startswith("stores Python objects") and "PurePosixPath" in reasons["objects"]
    assert "damaged or truncated" in reasons["truncated"]
    assert not any(UNSAFE_ADVICE in r for r in reasons.values())


def test_a_one_class_dataset_is_warned_about(tmp_path, caplog):
    _folder(tmp_path, classes=("only",))
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), decode_cache="off"))
    assert splits.num_classes == 1
    assert "single class" in caplog.text and "meaningless" in caplog.text
    caplog.clear()
    load_dataset(DataConfig(dataset="digits"))
    assert "single class" not in caplog.text


def test_a_mistyped_bundled_config_lists_the_bundled_names(capsys):
    assert main(["config", "--config", "digts"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'digits'" in err
    assert all(name in err for name in bundled_config_names())
    assert {"digits", "cifar10/dino"} <= set(bundled_config_names())


# ---- the memory preflight -----------------------------------------------------------------------

def test_the_memory_preflight_counts_the_mixtures_e_step_and_refuses_what_does_not_fit():
    from nocollapse.config import build_config
    from nocollapse.data.views import build_view_spec
    from nocollapse.engine.trainer import preflight

    cfg, _ = build_config(overrides=["method.num_prototypes=1024", "method.head.bottleneck_dim=64",
                                     "train.batch_size=8", "method.prototypes=decoupled"])
    k, d, rows = 1024, 64, 8 * 2
    # four K x D mixture tensors, the [rows, K] scores (x4 with their gradients and targets), and
    # the E-step's log-joint and responsibilities over the two global views' rows
    expected = 4 * k * d * 4 + 4 * rows * k * 4 + 2 * rows * k * 4
    assert DINO.estimate_state_bytes(cfg, rows) == expected
    learned, _ = build_config(overrides=["method.num_prototypes=1024", "method.head.bottleneck_dim=64",
                                         "train.batch_size=8", "method.prototypes=learned"])
    assert DINO.estimate_state_bytes(learned, rows) == 6 * k * d * 4 + 4 * rows * k * 4
    # CARP also holds the monitor's full-K teacher probabilities of the first view and their copy
    # back in prototype order, [8, K] each
    assert CARP.estimate_state_bytes(cfg, rows) == expected + 2 * 8 * k * 4
    spec = build_view_spec(cfg.views, 16, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="needs about .* GiB .* lower train.batch_size"):
        preflight(cfg, spec, 1, available=expected)          # more than 0.8 x what is available
    preflight(cfg, spec, 1, available=2 * expected)
