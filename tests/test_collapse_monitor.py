"""CollapseMonitor fed from a loop of our own: metrics, alarms, warm-up, files, state, and the
plain-loop example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nocollapse import CollapseMonitor
from nocollapse.diagnostics.monitor import TrainingMonitor

ROOT = Path(__file__).resolve().parents[1]


def _collapsed(batch=32, k=16):
    probs = torch.zeros(batch, k)
    probs[:, 3] = 1.0
    return probs


def _healthy(batch=32, k=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(5 * torch.randn(batch, k, generator=gen), dim=1)


def test_every_argument_is_optional_and_metrics_come_back_as_a_dict():
    monitor = CollapseMonitor()
    assert monitor.update(0) == {}
    out = monitor.update(1, probs=_healthy(), embeddings=torch.randn(32, 8), loss=2.0)
    assert {"mean_entropy", "effective_prototypes", "max_prob", "embedding_std"} <= set(out)
    assert monitor.num_prototypes == 16 and monitor.embedding_dim == 8
    epoch = monitor.end_epoch(prototypes=torch.randn(16, 8))
    assert "unique_0.1" in epoch and epoch["prototype_utilization_train"] > 0


def test_alarms_wait_for_the_warm_up_and_fire_once():
    monitor = CollapseMonitor(warmup_steps=10, patience=3)
    for step in range(10):
        monitor.update(step, probs=_collapsed(), loss=0.0)
    assert monitor.alarms == []
    for step in range(10, 20):
        monitor.update(step, probs=_collapsed(), loss=0.0)
    names = [a.name for a in monitor.alarms]
    assert "one_hot_collapse" in names and names.count("one_hot_collapse") == 1
    assert min(a.step for a in monitor.alarms) == 12


def test_a_healthy_stream_raises_nothing():
    monitor = CollapseMonitor(num_prototypes=16, warmup_steps=0, patience=2)
    for step in range(20):
        monitor.update(step, probs=_healthy(seed=step), embeddings=torch.randn(32, 8), loss=1.0)
    monitor.end_epoch(prototypes=torch.randn(16, 8))
    assert monitor.alarms == []


def test_log_dir_gets_jsonl_and_a_plot_and_log_every_thins_the_records(tmp_path):
    monitor = CollapseMonitor(log_every=4, log_dir=tmp_path, tensorboard=False)
    for step in range(12):
        monitor.update(step, probs=_healthy(seed=step), loss=float(step))
    monitor.end_epoch(12, prototypes=torch.randn(16, 4))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8, 12] and "unique_0.1" in records[-1]
    assert [p.name for p in monitor.plot(tmp_path)] == ["training_curves.png"]


def test_fixed_prototypes_get_no_geometry_but_their_use_is_counted():
    monitor = CollapseMonitor(num_prototypes=16, fixed_prototypes=True)
    monitor.update(0, probs=_healthy())
    epoch = monitor.end_epoch(prototypes=torch.randn(16, 4))
    assert "unique_0.1" not in epoch and "prototype_utilization_train" in epoch


def test_state_round_trip_keeps_fired_alarms_and_counts():
    monitor = CollapseMonitor(num_prototypes=16, warmup_steps=0, patience=1)
    monitor.update(0, probs=_collapsed())
    state = monitor.state_dict()
    again = CollapseMonitor(num_prototypes=16, warmup_steps=0, patience=1)
    again.load_state_dict(state)
    assert [a.name for a in again.alarms] == [a.name for a in monitor.alarms]
    assert torch.equal(again.argmax_counts, monitor.argmax_counts)
    again.update(1, probs=_collapsed())
    assert len(again.alarms) == len(monitor.alarms)       # each alarm fires once


def test_our_trainer_uses_the_same_monitor():
    assert issubclass(TrainingMonitor, CollapseMonitor)


@pytest.mark.slow
@pytest.mark.parametrize("collapse", [pytest.param(False, marks=pytest.mark.long), True])
def test_plain_loop_example_runs_and_its_collapse_variant_raises_alarms(tmp_path, collapse):
    args = [sys.executable, str(ROOT / "examples" / "plain_loop.py"), "--out", str(tmp_path), "--epochs", "12"]
    result = subprocess.run(args + (["--collapse"] if collapse else []), capture_output=True, text=True,
                            timeout=600, check=True)
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "training_curves.png").is_file()
    alarms = result.stdout.strip().splitlines()[-1]
    if collapse:
        assert "one_hot_collapse" in alarms
    else:
        assert alarms == "alarms: none"


def test_a_restored_monitor_keeps_the_history_before_the_restore(tmp_path):
    """A plain loop: a monitor logs 10 steps, its state is saved at step 5, the loop restarts from
    there with a new monitor. metrics.jsonl keeps steps 0-5 and holds 6-9 once, from the new run."""
    import torch

    from nocollapse import CollapseMonitor

    def feed(monitor, steps):
        for step in steps:
            monitor.update(step, probs=torch.softmax(torch.randn(8, 4), dim=1), embeddings=torch.randn(8, 3))

    first = CollapseMonitor(num_prototypes=4, alarms=False, log_dir=tmp_path)
    feed(first, range(6))
    state = first.state_dict()
    feed(first, range(6, 10))
    first.close()
    second = CollapseMonitor(num_prototypes=4, alarms=False, log_dir=tmp_path)
    second.load_state_dict(state)
    feed(second, range(6, 10))
    second.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10))
    assert [r["step"] for r in second.records] == list(range(10))      # the plot sees the whole history


def test_monitor_arguments_get_clear_errors(tmp_path):
    import torch

    from nocollapse import CollapseMonitor

    monitor = CollapseMonitor(num_prototypes=4)
    with pytest.raises(TypeError, match="needs the training step"):
        monitor.update(probs=torch.softmax(torch.randn(8, 4), dim=1))
    with pytest.raises(ValueError, match=r"probs must be a matrix \[B, K\]"):
        monitor.update(0, probs=torch.softmax(torch.randn(4), dim=0))
    with pytest.raises(ValueError, match="3 columns but the monitor has K = 4"):
        monitor.update(0, probs=torch.softmax(torch.randn(8, 3), dim=1))
    with pytest.raises(ValueError, match=r"embeddings must be a matrix \[B, D\]"):
        monitor.update(0, embeddings=torch.randn(8))
    assert monitor.updates == 0                                        # nothing was recorded
    with pytest.warns(UserWarning, match="needs|log_dir"):
        assert monitor.plot(tmp_path) == []


def test_held_out_function_is_called_at_checks_only_and_feeds_the_alarms():
    calls = []
    collapsed = torch.nn.functional.normalize(torch.ones(32, 8) + 1e-4 * torch.randn(32, 8), dim=1)
    spread = torch.randn(32, 8)

    def held_out():
        calls.append(torch.is_grad_enabled())
        return spread if len(calls) <= 2 else collapsed

    monitor = CollapseMonitor(embedding_dim=8, log_every=2, patience=2, warmup_steps=0, held_out=held_out)
    batch = torch.randn(16, 8)                          # a healthy training batch throughout
    metrics = [monitor.update(step, embeddings=batch) for step in range(10)]
    assert len(calls) == 5 and not any(calls)          # steps 0, 2, 4, 6, 8, under no_grad
    assert {"held_out_embedding_std", "held_out_mean_cosine", "held_out_direction_rank"} <= set(metrics[0])
    assert metrics[1] == {}
    assert metrics[4]["held_out_mean_cosine"] > 0.99
    assert [a.name for a in monitor.alarms] == ["representation_collapse"] and monitor.alarms[0].step == 6


def test_held_out_must_be_a_function_of_a_matrix():
    with pytest.raises(TypeError, match="held_out must be a function"):
        CollapseMonitor(held_out=torch.randn(4, 8))
    monitor = CollapseMonitor(embedding_dim=8, held_out=lambda: torch.randn(8))
    with pytest.raises(ValueError, match=r"held_out\(\) must return a \[P, D\] tensor"):
        monitor.update(0, embeddings=torch.randn(4, 8))


def test_the_trainer_encodes_a_fixed_held_out_draw_in_eval_mode_and_logs_its_metrics(tmp_path, tiny_overrides):
    from nocollapse.config import build_config
    from nocollapse.engine.trainer import Trainer

    cfg, _ = build_config(overrides=[*tiny_overrides, "train.epochs=1", "diagnostics.held_out_images=40",
                                     "diagnostics.plots=false"])
    Trainer(cfg, tmp_path / "run").fit()
    trainer = Trainer(cfg, tmp_path / "fresh")
    try:
        trainer.setup()
        encoder = trainer.monitor.held_out
        modules = list(encoder.network.modules())
        modules[-1].eval()                              # a module kept in eval mode stays so
        modes = [m.training for m in modules]
        first, second = encoder(), encoder()
        assert first.shape == (40, trainer.method.embedding_dim) and torch.equal(first, second)
        assert [m.training for m in modules] == modes and any(modes) and not all(modes)
    finally:
        trainer.release()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert steps and all({"held_out_mean_cosine", "held_out_direction_rank"} <= set(s) for s in steps)
    off, _ = build_config(overrides=[*tiny_overrides, "diagnostics.held_out_images=0"])
    trainer = Trainer(off, tmp_path / "off")
    try:
        trainer.setup()
        assert trainer.monitor.held_out is None
    finally:
        trainer.release()


def test_the_held_out_check_leaves_training_unchanged(tmp_path, tiny_overrides):
    """Eval mode, no gradient, its own random draw: the losses and weights of a run are the same
    with and without the check."""
    from nocollapse.config import build_config
    from nocollapse.engine.trainer import Trainer

    runs = {}
    for images in (0, 64):
        cfg, _ = build_config(overrides=[*tiny_overrides, f"diagnostics.held_out_images={images}",
                                         "diagnostics.plots=false", "eval.knn_every=0"])
        trainer = Trainer(cfg, tmp_path / str(images))
        trainer.fit()
        records = [json.loads(line) for line in (tmp_path / str(images) / "metrics.jsonl").read_text().splitlines()]
        runs[images] = ([r["loss"] for r in records if "loss" in r],
                        {k: v.clone() for k, v in trainer.method.state_dict().items()})
    assert runs[0][0] == runs[64][0] and len(runs[0][0]) >= 2
    assert runs[0][1].keys() == runs[64][1].keys()
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[64][1][key]), key
