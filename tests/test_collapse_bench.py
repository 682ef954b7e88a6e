"""The alarm benchmark's ground truth and scores (benchmarks/collapse_bench.py) on hand-made
probe histories: each collapse kind is recognised from its definition, onsets need two
consecutive probe checks, and alarms are scored as detections, misses, false or wrong-kind alarms."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("collapse_bench")


def state(step, cosine=0.1, spread=0.12, rank=30.0, used=None, entropy=None, k=64):
    s = {"step": step, "mean_cosine": cosine, "spread": spread, "rankme": rank}
    if used is not None:
        s.update(argmax_used=used, num_prototypes=k, min_entropy_ratio=entropy if entropy is not None else 0.5)
    return s


RANKS = {step: 30.0 for step in range(0, 200, 10)}


def run(name, probe, knn=(0.5, 0.6), alarms=(), unique=None):
    return {"name": name, "probe": probe, "knn_top1_init": knn[0], "knn_top1": knn[1], "unique_0.1": unique,
            "alarms": [{"name": n, "step": s} for n, s in alarms]}


def test_probe_state_measures_a_point_and_a_spread_batch(bench):
    g = torch.Generator().manual_seed(0)
    spread = bench.probe_state(torch.randn(300, 16, generator=g), None, 0)
    point = bench.probe_state(torch.ones(300, 16) + 1e-3 * torch.randn(300, 16, generator=g), None, 0)
    assert abs(spread["mean_cosine"]) < 0.05 and point["mean_cosine"] > 0.99
    assert point["spread"] < 0.01 * spread["spread"]
    probs = torch.full((300, 8), 1 / 8)
    uniform = bench.probe_state(torch.randn(300, 16, generator=g), probs, 0)
    assert uniform["min_entropy_ratio"] == pytest.approx(1.0) and uniform["argmax_used"] == 1


def test_each_kind_needs_two_consecutive_checks_and_gives_its_onset(bench):
    probe = [state(0), state(10, cosine=0.95, spread=0.01), state(20), state(30, cosine=0.95, spread=0.01),
             state(40, cosine=0.95, spread=0.01), state(50, cosine=0.95, spread=0.01, rank=5.0),
             state(60, cosine=0.95, spread=0.01, rank=5.0)]
    label = bench.label_run(run("r", probe), healthy_rank=RANKS)
    assert label["onsets"] == {"representation": 30, "dimensional": 50}
    assert label["failing"]
    # a cone from the start (high cosine, spread not falling) is not representation collapse
    cone = [state(s, cosine=0.95, spread=0.03) for s in (0, 10, 20)]
    assert bench.label_run(run("cone", cone), RANKS)["onsets"] == {}
    # a kind that went away by the end is transient, and not a failure
    dip = [state(0), state(10, rank=5.0), state(20, rank=5.0), state(30)]
    label = bench.label_run(run("dip", dip), RANKS)
    assert label["onsets"] == {} and label["transient"] == {"dimensional": 10} and not label["failing"]
    # the reference run of a pair is not checked for dimensional collapse
    assert bench.label_run(run("ref", dip), None)["transient"] == {}


def test_dimensional_collapse_is_judged_against_the_healthy_run_at_the_same_step(bench):
    early = {0: 4.0, 10: 4.0, 20: 40.0}             # the healthy run's rank grows while it learns
    probe = [state(0, rank=3.0), state(10, rank=3.0), state(20, rank=3.0)]
    assert bench.label_run(run("slow", probe), early)["onsets"] == {}
    assert bench.kind_holds("dimensional", state(20, rank=3.0), early, 0.12)
    assert not bench.kind_holds("dimensional", state(10, rank=3.0), early, 0.12)


def test_cluster_uniform_and_the_knn_criterion(bench):
    cluster = [state(0, used=40), state(10, used=2), state(20, used=1)]
    assert bench.label_run(run("c", cluster), RANKS)["onsets"] == {"cluster": 10}
    uniform = [state(0, used=40, entropy=0.5), state(10, used=40, entropy=0.99), state(20, used=40, entropy=0.985)]
    assert bench.label_run(run("u", uniform), RANKS)["onsets"] == {"uniform": 10}
    # no onset, but the k-NN does not beat the init: failing; above it: healthy
    assert bench.label_run(run("k", [state(0), state(10)], knn=(0.6, 0.6)), RANKS)["failing"]
    healthy = bench.label_run(run("h", [state(0), state(10)], knn=(0.6, 0.7), unique=0.3), RANKS)
    assert not healthy["failing"] and healthy["partial_prototype_collapse"]
    # the cluster bound follows min(K, N): 1 % of 450 probe images for a large K
    assert bench.kind_holds("cluster", state(0, used=4, k=65536), 30.0, 0.12)
    assert not bench.kind_holds("cluster", state(0, used=5, k=65536), 30.0, 0.12)
    # ... and 1 % of the probe's own size when the probe records it (the CIFAR subset's 1,000)
    assert bench.kind_holds("cluster", {**state(0, used=10, k=65536), "probe_size": 1000}, 30.0, 0.12)
    assert not bench.kind_holds("cluster", {**state(0, used=11, k=65536), "probe_size": 1000}, 30.0, 0.12)


def test_cifar_subset_links_the_first_images_of_each_class_and_is_reused(bench, tmp_path):
    for split, count in (("train", 5), ("test", 3)):
        for name in ("cat", "dog"):
            folder = tmp_path / "cifar" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:04d}.jpg").write_bytes(b"x")
    out = bench.cifar_subset(tmp_path / "cifar", tmp_path / "subset", {"train": 2, "test": 1})
    assert sorted(p.name for p in (out / "train" / "cat").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert [p.name for p in (out / "test" / "dog").iterdir()] == ["0000.jpg"]
    assert (out / "train" / "cat" / "0000.jpg").resolve() == (tmp_path / "cifar" / "train" / "cat" / "0000.jpg").resolve()
    bench.cifar_subset(tmp_path / "cifar", tmp_path / "subset", {"train": 2, "test": 1})  # made once, reused
    with pytest.raises(FileNotFoundError, match="CIFAR-10 root"):
        bench.cifar_subset(tmp_path / "nowhere", tmp_path / "other")


def test_scores_count_detections_misses_false_and_wrong_kind_alarms(bench):
    runs = [
        run("caught", [state(0), state(10, cosine=0.95, spread=0.01), state(20, cosine=0.95, spread=0.01)],
            alarms=[("representation_collapse", 35)]),
        run("missed", [state(0), state(10, cosine=0.95, spread=0.01), state(20, cosine=0.95, spread=0.01)]),
        run("healthy", [state(0), state(10)], knn=(0.5, 0.7), alarms=[("uniform_collapse", 20)]),
        run("other kind", [state(0), state(10, rank=1.0), state(20, rank=1.0)], alarms=[("uniform_collapse", 25)]),
    ]
    for r in runs:
        r["label"] = bench.label_run(r, RANKS)
    scores = bench.score(runs)
    rep = scores["per_alarm"]["representation_collapse"]
    assert rep["detections"] == [{"run": "caught", "delay": 25}] and rep["misses"] == ["missed"]
    uni = scores["per_alarm"]["uniform_collapse"]
    assert uni["false_alarms"] == ["healthy"] and uni["wrong_kind"] == ["other kind"]
    assert scores["failing_caught_by_right_kind"] == ["caught"]
    assert scores["healthy_with_a_collapse_alarm"] == ["healthy"]
    assert math.isclose(rep["median_delay"], 25)


def test_replaying_a_runs_recorded_alarm_inputs_gives_the_alarms_it_raised(bench):
    run = bench.run_loop_case("loop_simsiam_plain_no_stop_gradient", 0, epochs=10)
    raised = sorted((a["name"], a["step"]) for a in run["alarms"] if a["name"] in bench.ALARM_KIND)
    assert ("representation_collapse" in dict(raised)) and run["alarm_inputs"]["stream"]
    replayed = sorted((a["name"], a["step"]) for a in bench.replay_alarms(run))
    assert replayed == raised
    # other settings, tried on the same stream without training: a threshold no batch (and no
    # held-out set) can pass
    strict = bench.replay_alarms(run, {"representation_cosine": 1.0, "held_out_cosine": 1.0,
                                       "representation_fraction": 0.0})
    assert "representation_collapse" not in {a["name"] for a in strict}
    assert bench.replay_alarms({"name": "old record", "alarms": []}) is None
