"""OnlineProbe: prequential k-NN and linear accuracies, the FIFO bank, unlabelled rows, state,
clear errors, the monitor's use of it, and two processes equal one on the joined batch."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_distributed
from nocollapse import CollapseMonitor, OnlineProbe


def _clusters(n, num_classes=4, dim=8, noise=0.05, seed=0):
    """Rows near one of ``num_classes`` orthogonal directions; the label is the direction."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    features = torch.eye(dim)[labels] + noise * torch.randn(n, dim, generator=gen)
    return features, labels


def test_a_batch_is_predicted_before_the_probe_learns_from_it():
    probe = OnlineProbe(4, linear=False, k=1)
    first = probe.update(*_clusters(8))
    assert "online_knn_top1" not in first                 # nothing in the bank to vote yet
    assert probe.bank_filled == 8
    # labels swapped against the bank: the nearest neighbour votes for the bank's label
    features, labels = _clusters(8, seed=1)
    second = probe.update(features, (labels + 1) % 4)
    assert second["online_knn_top1"] == 0.0
    third = probe.update(*_clusters(8, seed=2))            # the bank now holds both labellings
    assert 0.0 <= third["online_knn_top1"] <= 1.0
    epoch = probe.end_epoch()
    assert epoch["online_knn_top1"] == pytest.approx((0 * 8 + third["online_knn_top1"] * 8) / 16)
    assert probe.end_epoch() == {}                        # counts restart each epoch


def test_the_bank_keeps_the_most_recent_labelled_rows_only():
    probe = OnlineProbe(3, linear=False, bank_size=4)
    probe.update(torch.eye(3)[[0, 1, 2]], torch.tensor([0, 1, 2]))
    probe.update(torch.eye(3)[[0, 1, 2]] * 2, torch.tensor([0, -1, 2]))   # the -1 row is skipped
    assert probe.bank_filled == 4
    held = sorted(map(tuple, probe.bank_features.tolist()))
    assert held == sorted([(0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (2.0, 0.0, 0.0), (0.0, 0.0, 2.0)])
    assert probe.update(torch.zeros(2, 3), torch.tensor([-1, -1])) == {}   # nothing labelled


def test_the_linear_probe_learns_and_sends_no_gradient_back():
    probe = OnlineProbe(4, knn=False, lr=0.05)
    for epoch in range(5):
        for seed in range(10):
            features, labels = _clusters(32, seed=100 * epoch + seed)
            features.requires_grad_(True)
            probe.update(features, labels)
            assert features.grad is None
        result = probe.end_epoch()
        if epoch == 0:
            first = result["online_linear_top1"]
    assert result["online_linear_top1"] > 0.95 and result["online_linear_top1"] >= first
    held_out = probe.evaluate(*_clusters(64, seed=999))
    assert held_out["val_online_linear_top1"] > 0.95
    assert "val_online_knn_top1" not in held_out


def test_state_dict_round_trip_continues_identically():
    a = OnlineProbe(4, bank_size=16, seed=3)
    for seed in range(3):
        a.update(*_clusters(8, seed=seed))
    b = OnlineProbe(4, bank_size=16, seed=7)
    b.load_state_dict(a.state_dict())
    batch = _clusters(8, seed=50, noise=0.6)
    assert a.update(*batch) == b.update(*batch)
    torch.testing.assert_close(a.classifier.state_dict(), b.classifier.state_dict())
    with pytest.raises(ValueError, match="bank_size"):
        OnlineProbe(4, bank_size=32).load_state_dict(a.state_dict())


@pytest.mark.parametrize("call, message", [
    (lambda p: p.update(torch.zeros(4, 8), torch.tensor([0, 1, 2, 9])), r"\[-1, 4\)"),
    (lambda p: p.update(torch.zeros(4, 8), torch.tensor([0, 1])), "2 labels for 4"),
    (lambda p: p.update(torch.zeros(8), torch.tensor([0])), r"\[B, F\]"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(OnlineProbe(4))


def test_a_built_probe_rejects_features_of_another_width():
    probe = OnlineProbe(4)
    probe.update(*_clusters(8))
    with pytest.raises(ValueError, match="8"):
        probe.update(torch.zeros(4, 5), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        OnlineProbe(1)
    with pytest.raises(ValueError, match="knn=True or linear=True"):
        OnlineProbe(4, knn=False, linear=False)


def test_the_monitor_reports_the_probe_and_restores_it(tmp_path):
    monitor = CollapseMonitor(probe=OnlineProbe(4, bank_size=64), log_every=2, log_dir=tmp_path)
    for step in range(6):
        features, labels = _clusters(16, seed=step)
        out = monitor.update(step, features=features, labels=labels)
        assert ("online_linear_top1" in out) == (step % 2 == 0)
    epoch = monitor.end_epoch()
    assert epoch["online_knn_top1"] > 0.9 and "online_linear_top1" in epoch
    assert "val_online_knn_top1" in monitor.evaluate(6, *_clusters(16, seed=77))
    fresh = CollapseMonitor(probe=OnlineProbe(4, bank_size=64), log_every=2)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.probe.bank_filled == monitor.probe.bank_filled
    monitor.close()
    with pytest.raises(ValueError, match="no probe"):
        CollapseMonitor().update(0, features=torch.zeros(2, 3), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features"):
        CollapseMonitor(probe=OnlineProbe(4)).update(0, labels=torch.tensor([0, 1]))


def _probe_on_a_shard(rank, world_size, batches):
    probe = OnlineProbe(4, bank_size=24, seed=1)
    steps = []
    for features, labels in batches:
        rows = features.shape[0] // world_size
        shard = slice(rank * rows, (rank + 1) * rows)
        steps.append(probe.update(features[shard], labels[shard]))
    return {"steps": steps, "epoch": probe.end_epoch(), "state": probe.state_dict()["classifier"],
            "bank": probe.bank_features.clone()}


def test_two_processes_equal_one_process_on_the_joined_batch():
    batches = [_clusters(8, noise=0.5, seed=s) for s in range(5)]
    batches = [(f, torch.where(torch.arange(8) == 3, -1, y)) for f, y in batches]   # one unlabelled row
    single = _probe_on_a_shard(0, 1, batches)
    for result in run_distributed(_probe_on_a_shard, world_size=2, args=(batches,)):
        assert len(result["steps"]) == len(single["steps"])
        for got, want in zip(result["steps"], single["steps"]):
            assert got == pytest.approx(want)
        assert result["epoch"] == pytest.approx(single["epoch"])
        torch.testing.assert_close(result["state"], single["state"])
        torch.testing.assert_close(result["bank"], single["bank"])


def test_nocollapse_train_reports_the_online_probe_and_resumes_it(tmp_path, tiny_overrides):
    import json

    from nocollapse.cli import main
    from nocollapse.utils.checkpoint import load_checkpoint

    common = [*tiny_overrides, "diagnostics.online_probe=true", "diagnostics.online_probe_bank=256",
              "train.deterministic=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), "--set", *common]) == 0
    assert main(["train", "--out", str(part), "--set", *common, "train.stop_at_step=30"]) == 3
    assert main(["train", "--out", str(part), "--resume"]) == 0

    def epochs(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "online_knn_top1" in r and "loss" not in r]

    assert len(epochs(full)) == 2
    assert epochs(full)[-1]["online_linear_top1"] == pytest.approx(epochs(part)[-1]["online_linear_top1"])
    assert epochs(full)[-1]["online_knn_top1"] == pytest.approx(epochs(part)[-1]["online_knn_top1"])
    probe = load_checkpoint(full / "checkpoints" / "last.pt")["state"]["monitor"]["probe"]
    assert probe["bank_filled"] == 256
