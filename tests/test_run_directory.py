"""The run directory as a safe container: training never deletes what it did not write (a
manifest and ``--force``), one run per directory at a time (a lock), and ``--resume`` checks
before it writes (one model factory for training and ``runs.load_run``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nocollapse.cli import main
from nocollapse.utils import run_directory as rd
from nocollapse.utils.checkpoint import atomic_save, load_checkpoint

from conftest import TINY

FIXTURE_0_1 = Path(__file__).resolve().parent / "fixtures" / "run_0.1_digits"
ONE_EPOCH = [*TINY, "train.epochs=1", "eval.knn_init=false"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_files(root: Path) -> dict[str, bytes]:
    files = {"notes.txt": b"my notes\n", "plots/figure1.png": b"\x89PNG mine",
             "features/feat.npy": b"\x93NUMPY mine"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hand_written_lock(run: Path, pid: int) -> None:
    """A lock file as a run leaves it when it dies without a word, with no flock held."""
    run.mkdir(parents=True, exist_ok=True)
    (run / rd.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                                "started": "2024-01-01 00:00:00", "command": "nocollapse train"}))


# ---- the manifest ------------------------------------------------------------------------------

def test_manifest_lists_what_was_written_and_force_removes_only_that(tmp_path):
    run = tmp_path / "run"
    rd.record(run, run / "a.txt", run / "sub" / "b.txt", tmp_path / "outside.txt")
    for name in ("a.txt", "sub/b.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("package")
    (run / "sub" / "mine.txt").write_text("user")
    (run / "notes.txt").write_text("user")
    (tmp_path / "outside.txt").write_text("user")
    assert rd.read_manifest(run) == ["a.txt", "sub/b.txt"]          # the outside path is not listed
    assert sorted(p.name for p in run.iterdir()) == ["a.txt", "manifest.json", "notes.txt", "sub"]  # no temporary
    # a tampered manifest cannot reach outside the run directory, nor remove a folder
    data = json.loads((run / "manifest.json").read_text())
    data["files"] += ["../outside.txt", str(tmp_path / "outside.txt"), "sub"]
    (run / "manifest.json").write_text(json.dumps(data))
    removed = rd.clear_run(run)
    assert sorted(p.relative_to(run).as_posix() for p in removed) == ["a.txt", "sub/b.txt"]
    assert _files(run) == {"notes.txt": b"user", "sub/mine.txt": b"user"}
    assert (tmp_path / "outside.txt").read_text() == "user"


def test_a_damaged_manifest_stops_force_before_anything_is_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    (run / "manifest.json").write_text('{"format": "nocollapse-manif')
    with pytest.raises(rd.RunDirectoryError, match="manifest.json is damaged"):
        rd.clear_run(run)
    assert sorted(_files(run)) == ["config.yaml", "manifest.json"]


@pytest.mark.slow
def test_user_files_survive_train_and_force(tmp_path, capsys):
    proj = tmp_path / "myproj"
    mine = _user_files(proj)
    with pytest.raises(SystemExit, match=r"myproj is not empty.*--force"):
        main(["train", "--out", str(proj), "--set", *ONE_EPOCH])
    assert _files(proj) == mine                                      # refused before anything was written
    for _ in range(2):                                               # into the folder, then over its own run
        assert main(["train", "--out", str(proj), "--force", "--set", *ONE_EPOCH]) == 0
        files = _files(proj)
        assert {k: files[k] for k in mine} == mine
        listed = rd.read_manifest(proj)
        assert "checkpoints/last.pt" in listed and "plots/training_curves.png" in listed
        assert not set(mine) & set(listed)
        assert set(files) - set(listed) == {*mine, "manifest.json"}  # every other file is listed


@pytest.mark.slow
def test_a_finished_run_without_checkpoints_keeps_its_results_unless_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", *ONE_EPOCH]) == 0
    assert main(["eval", str(run), "--knn"]) == 0
    assert main(["diagnose", str(run), "--no-data"]) == 0
    assert main(["export", str(run), "--out", str(run / "backbone.pt")]) == 0
    listed = rd.read_manifest(run)
    assert {"eval.json", "diagnosis.json", "backbone.pt", "backbone.pt.json"} <= set(listed)
    shutil.rmtree(run / "checkpoints")
    mine = _user_files(run)
    before = _files(run)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--out", str(run), "--set", *ONE_EPOCH])
    assert _files(run) == before                                     # eval.json and everything else kept
    assert main(["train", "--out", str(run), "--force", "--set", *ONE_EPOCH, "diagnostics.plots=false"]) == 0
    after = _files(run)
    assert {k: after[k] for k in mine} == mine
    for gone in ("eval.json", "backbone.pt", "backbone.pt.json", "plots/training_curves.png"):
        assert gone not in after, gone                               # the earlier run's files
    assert "checkpoints/last.pt" in after and "summary.json" in after


@pytest.mark.slow
def test_force_on_a_run_written_before_manifests_removes_only_the_package_names(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FIXTURE_0_1, run)
    atomic_save({"stale": torch.ones(1)}, run / "checkpoints" / "epoch_0009.pt")
    (run / "notes.txt").write_text("mine")
    assert rd.read_manifest(run) is None and rd.looks_like_legacy_run(run)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--out", str(run), "--set", *ONE_EPOCH])
    assert main(["train", "--out", str(run), "--force", "--set", *ONE_EPOCH]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoints" / "epoch_0009.pt").exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["nocollapse"] != "0.1.0"
    assert "notes.txt" not in rd.read_manifest(run)


# ---- the lock ----------------------------------------------------------------------------------

def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    run = tmp_path / "run"
    lock = rd.acquire_run_lock(run)
    with pytest.raises(rd.RunLockedError, match=rf"pid {os.getpid()} on .*, started "):
        rd.acquire_run_lock(run)
    assert rd.lock_holder(run)["pid"] == os.getpid()
    lock.release()
    assert not (run / rd.LOCK_NAME).exists() and rd.lock_holder(run) is None
    assert not run.exists()                          # the lock made the directory and nothing was written
    with rd.acquire_run_lock(run):
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    # the module needs only the standard library: load it alone, without torch, to start quickly
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util, sys, time; "
         "spec = importlib.util.spec_from_file_location('run_directory', sys.argv[2]); "
         "rd = importlib.util.module_from_spec(spec); spec.loader.exec_module(rd); "
         "lock = rd.acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(run), rd.__file__], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rd.RunLockedError, match=f"pid {holder.pid}"):
            rd.acquire_run_lock(run)
    finally:
        holder.kill()
        holder.wait()
    assert (run / rd.LOCK_NAME).exists()             # kill -9: the file stays, its flock is gone
    assert rd.lock_holder(run) is None
    with rd.acquire_run_lock(run):
        assert rd.lock_holder(run)["pid"] == os.getpid()


def test_a_lock_file_naming_a_live_process_of_this_host_is_respected(tmp_path):
    """On a file system where flock does nothing, the pid is what keeps a second run out."""
    run = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _hand_written_lock(run, sleeper.pid)
        with pytest.raises(rd.RunLockedError, match=f"pid {sleeper.pid}"):
            rd.acquire_run_lock(run)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_stale_lock_from_a_dead_pid_is_taken_over_by_train(tmp_path):
    run = tmp_path / "run"
    _hand_written_lock(run, _dead_pid())
    assert main(["train", "--out", str(run), "--set", *ONE_EPOCH, "diagnostics.plots=false"]) == 0
    assert not (run / rd.LOCK_NAME).exists()         # released at the end
    assert (run / "summary.json").is_file()


@pytest.mark.slow
def test_a_second_train_on_a_running_directory_fails_naming_the_first(tmp_path, capsys):
    from nocollapse.config import build_config
    from nocollapse.engine.trainer import Trainer

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "nocollapse.cli", "train", "--out", str(run), "--set", *TINY,
                              "train.epochs=50", "eval.knn_init=false"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        # Locked, config written, training: the first record in metrics.jsonl (setup creates the
        # file empty, before the trainer installs its SIGTERM handler; records come after it).
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
            if first.poll() is not None:
                pytest.fail(f"the first run ended early: {first.stderr.read()}")
            assert time.time() < deadline, "the first run did not start training in time"
            time.sleep(0.1)
        config = (run / "config.yaml").read_bytes()
        named = rf"in use by another nocollapse run \(pid {first.pid} on .*, started .*nocollapse"
        for extra in ([], ["--force"]):
            with pytest.raises(SystemExit, match=named):
                main(["train", "--out", str(run), "--set", *ONE_EPOCH, *extra])
        # the trainer's own check, under the lock, after the data are loaded
        cfg, _ = build_config(overrides=ONE_EPOCH)
        with pytest.raises(rd.RunLockedError, match=named):
            Trainer(cfg, run, force=True).fit()
        assert (run / "config.yaml").read_bytes() == config
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 3, first.stderr.read()   # stopped cleanly, after writing last.pt
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (run / rd.LOCK_NAME).exists()          # released on the SIGTERM path


@pytest.mark.slow
def test_keyboard_interrupt_and_errors_release_the_lock(tmp_path, monkeypatch):
    from nocollapse.engine.trainer import Trainer

    def interrupted(self):
        assert rd.lock_holder(self.run_dir)["pid"] == os.getpid()   # held while training
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out", str(run), "--set", *ONE_EPOCH])
    assert not (run / rd.LOCK_NAME).exists()
    monkeypatch.setattr(Trainer, "train_one_epoch", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--out", str(run), "--force", "--set", *ONE_EPOCH])
    assert not (run / rd.LOCK_NAME).exists()


# ---- resume --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A DINO run (decoupled prototypes) stopped at step 30 of 42 (21 steps per epoch)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--out", str(run), "--set", *TINY, "eval.knn_init=false", "train.stop_at_step=30"]) == 3
    return run


@pytest.fixture
def resumable(stopped_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    (["method.name=carp"], "method.name ('dino' -> 'carp')"),
    (["model.width_multiplier=0.25"], "model.width_multiplier (0.125 -> 0.25)"),
    (["gmm.covariance=isotropic"], "gmm.covariance ('diagonal' -> 'isotropic')"),
    (["gmm.buffer_factor=2"], "gmm.buffer_factor (0.0 -> 2.0)"),   # found by loading: a buffer's shape
])
def test_resume_refuses_a_change_of_model_or_data_before_writing(resumable, capsys, change, named):
    before = _files(resumable)
    assert main(["train", "--out", str(resumable), "--resume", "--set", *change]) == 2
    err = capsys.readouterr().err
    assert named in err and "Nothing in" in err and "Traceback" not in err
    assert _files(resumable) == before                               # config.yaml included, byte for byte


@pytest.mark.slow
def test_a_refused_resume_leaves_a_run_that_resumes(resumable, capsys):
    config = resumable / "config.yaml"
    original = config.read_bytes()
    # a config.yaml edited by hand disagrees with the checkpoint: the trainer's own check finds it
    config.write_text(original.decode().replace("width_multiplier: 0.125", "width_multiplier: 0.25"))
    edited = _files(resumable)
    assert main(["train", "--out", str(resumable), "--resume"]) == 2
    assert "model.width_multiplier (0.125 -> 0.25)" in capsys.readouterr().err
    assert _files(resumable) == edited
    config.write_bytes(original)
    assert main(["train", "--out", str(resumable), "--resume", "--set", "method.name=carp"]) == 2
    assert main(["train", "--out", str(resumable), "--resume"]) == 0
    assert load_checkpoint(resumable / "checkpoints" / "last.pt")["step"] == 42


@pytest.mark.slow
def test_resume_with_another_batch_size_warns_about_the_schedules(resumable, caplog):
    assert main(["train", "--out", str(resumable), "--resume", "--set", "train.batch_size=32"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--resume" in r.getMessage())
    assert "train.batch_size (64 -> 32)" in warning
    assert "42 steps instead of 21" in warning and "cosine" in warning and "84 steps instead of 42" in warning
    # the rest of epoch 2 is re-cut: batch 9 of 42 onwards
    assert load_checkpoint(resumable / "checkpoints" / "last.pt")["step"] == 30 + (42 - 9)


@pytest.mark.slow
def test_resume_with_more_epochs_warns_and_trains_them(resumable, caplog):
    assert main(["train", "--out", str(resumable), "--resume", "--set", "train.epochs=3"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--resume" in r.getMessage())
    assert "train.epochs (2 -> 3)" in warning and "63 steps instead of 42" in warning
    assert load_checkpoint(resumable / "checkpoints" / "last.pt")["step"] == 63


@pytest.mark.slow
def test_resume_may_change_the_optimiser_settings(resumable, caplog):
    assert main(["train", "--out", str(resumable), "--resume", "--set", "optim.lr=0.001", "optim.betas=[0.8,0.99]"]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "--resume" in r.getMessage()]
    ckpt = load_checkpoint(resumable / "checkpoints" / "last.pt")
    assert ckpt["step"] == 42 and ckpt["config"]["optim"]["lr"] == 0.001
    assert "lr: 0.001" in (resumable / "config.yaml").read_text()
    # the config's betas, not the saved optimiser's, drove the resumed steps
    assert all(list(g["betas"]) == [0.8, 0.99] for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.slow
def test_load_run_and_training_agree_on_steps_per_epoch(stopped_run, tmp_path):
    from nocollapse.data import EpochBatchSampler
    from nocollapse.runs import load_run

    run = load_run(stopped_run)
    assert run.method.steps_per_epoch == 1347 // 64
    # a run trained by 2 processes: N // (B x W), as its training batches were cut
    ckpt = load_checkpoint(stopped_run / "checkpoints" / "last.pt")
    two = tmp_path / "checkpoints" / "two.pt"
    atomic_save({**ckpt, "world_size": 2}, two)
    method = load_run(two).method
    assert method.steps_per_epoch == len(EpochBatchSampler(1347, 64, seed=0, rank=0, world_size=2)) == 10
    assert method.total_steps == 10 * 2


def test_an_atomic_write_that_fails_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    """The rename is the only moment the file changes: a failure before it (disk full, a kill)
    leaves the previous content, and the hidden temporary is cleaned up."""
    path = tmp_path / "summary.json"
    rd.write_json_atomically(path, {"knn": 0.9})
    assert json.loads(path.read_text()) == {"knn": 0.9}

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rd.os, "replace", no_room)
    with pytest.raises(OSError, match="No space"):
        rd.write_json_atomically(path, {"knn": 0.1})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"knn": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    # data that is not JSON fails before anything is written
    with pytest.raises(TypeError):
        rd.write_json_atomically(path, {"knn": object()})
    assert json.loads(path.read_text()) == {"knn": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_resume_keeps_every_logged_record_up_to_its_checkpoint_even_if_the_rewrite_fails(tmp_path, monkeypatch):
    """On resume, metrics.jsonl drops what was logged after the checkpoint by replacing the file;
    a rewrite that fails leaves the whole previous log, never a truncated one."""
    from nocollapse.utils.metrics_log import MetricsLogger, read_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]

    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))

    def io_error(*args, **kwargs):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(rd.os, "replace", io_error)
    with pytest.raises(OSError):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
