"""A few cases of the alarm benchmark (benchmarks/collapse_bench.py) at a size the suite can run:
for each collapse kind a healthy and a broken run, labelled by the benchmark's ground truth (the
held-out probe), not by their names. The broken run must raise the alarm of its kind, and no run
may raise a collapse alarm of a kind its probe never showed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(import_benchmark):
    return import_benchmark("collapse_bench")


def fired_kinds(bench, run) -> dict[str, int]:
    return {bench.ALARM_KIND[a["name"]]: a["step"] for a in run["alarms"] if a["name"] in bench.ALARM_KIND}


def check_pair(bench, healthy: dict, broken: dict, kind: str) -> None:
    healthy_rank = {s["step"]: s["rankme"] for s in healthy["probe"]}
    labels = {"healthy": bench.label_run(healthy, None), "broken": bench.label_run(broken, healthy_rank)}
    assert kind in labels["broken"]["onsets"], labels["broken"]        # the switch still breaks at this size
    assert kind not in labels["healthy"]["onsets"], labels["healthy"]
    assert kind in fired_kinds(bench, broken), broken["alarms"]
    for role, run in (("healthy", healthy), ("broken", broken)):
        shown = set(labels[role]["onsets"]) | set(labels[role]["transient"])
        assert set(fired_kinds(bench, run)) <= shown, (role, run["alarms"], labels[role])


def test_representation_collapse_of_a_simsiam_loop_without_stop_gradient(bench):
    healthy = bench.run_loop_case("loop_simsiam_plain", 0, epochs=10)
    broken = bench.run_loop_case("loop_simsiam_plain_no_stop_gradient", 0, epochs=10)
    check_pair(bench, healthy, broken, "representation")


def test_cluster_collapse_of_lightly_dino_with_a_frozen_zero_centre(bench):
    pytest.importorskip("lightly")
    healthy = bench.run_loop_case("loop_lightly_dino", 0, epochs=15)
    broken = bench.run_loop_case("loop_lightly_dino_frozen_centre", 0, epochs=15)
    check_pair(bench, healthy, broken, "cluster")


def test_uniform_collapse_of_lightly_dino_with_a_flat_teacher(bench):
    pytest.importorskip("lightly")
    healthy = bench.run_loop_case("loop_lightly_dino", 0, epochs=6)
    broken = bench.run_loop_case("loop_lightly_dino_flat_teacher", 0, epochs=6)
    check_pair(bench, healthy, broken, "uniform")


# the digits recipe's Barlow Twins (512-wide projector) on a narrower backbone at 8 px
TINY_BARLOW_TWINS = ["data.image_size=8", "model.width_multiplier=0.125", "optim.warmup_epochs=1"]


def test_dimensional_collapse_of_barlow_twins_without_its_off_diagonal_term(bench):
    healthy = bench.run_trainer_case("barlow_twins", 0, epochs=20, extra=TINY_BARLOW_TWINS)
    broken = bench.run_trainer_case("barlow_twins_no_offdiag", 0, epochs=20, extra=TINY_BARLOW_TWINS)
    check_pair(bench, healthy, broken, "dimensional")
