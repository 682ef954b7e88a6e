"""Alarms in tiers, each one declared rule (diagnostics/alarms.py)."""

from __future__ import annotations

import torch

from nocollapse.diagnostics.alarms import (
    ALARM_NAMES,
    ALARM_RULES,
    COLLAPSE_ALARMS,
    TIERS,
    WARNINGS,
    Alarm,
    AlarmMonitor,
)
from nocollapse.diagnostics.monitor import CollapseMonitor


def test_every_alarm_is_one_rule_with_a_tier_a_check_a_cause_and_a_remedy():
    assert ALARM_NAMES == tuple(rule.name for rule in ALARM_RULES)
    assert len(set(ALARM_NAMES)) == len(ALARM_NAMES)
    for rule in ALARM_RULES:
        assert rule.tier in TIERS and callable(getattr(AlarmMonitor, rule.check)) and rule.cause and rule.remedy
    assert set(COLLAPSE_ALARMS) == {"uniform_collapse", "one_hot_collapse", "representation_collapse",
                                    "dimensional_collapse"}
    assert set(WARNINGS) == {"unused_prototypes", "prototype_collapse"}


def unused_metrics():
    return {"argmax_used": 2, "num_samples": 64, "max_prob": 0.5}


def test_a_warning_reads_as_wasted_capacity_and_an_alarm_as_a_failure():
    monitor = AlarmMonitor(64, warmup_steps=0, patience=1)
    fired = {a.name: a for a in monitor.update(1, {**unused_metrics(), "loss": 1.0, "embedding_std": 1e-6,
                                                   "embedding_dim": 16})}
    warning, alarm = fired["unused_prototypes"], fired["representation_collapse"]
    assert warning.tier == "warning" and str(warning).startswith("[nocollapse] WARNING unused_prototypes")
    assert "not a failure" in str(warning)
    assert alarm.tier == "collapse" and str(alarm).startswith("[nocollapse] ALARM representation_collapse")


def test_warnings_can_be_silenced_and_the_collapse_alarms_stay():
    for warnings in (True, False):
        monitor = CollapseMonitor(num_prototypes=64, embedding_dim=16, patience=1, warnings=warnings,
                                  tensorboard=False)
        probs = torch.zeros(64, 64)
        probs[:, :2] = 0.5                     # two of the 64 prototypes a batch of 64 can use
        flat = torch.ones(64, 16)              # every embedding the same: representation collapse
        monitor.update(step=1, probs=probs, embeddings=flat)
        names = {a.name for a in monitor.alarms}
        assert "representation_collapse" in names
        assert ("unused_prototypes" in names) == warnings
        epoch = monitor.end_epoch(step=1, prototypes=torch.ones(64, 16))
        assert epoch["unique_0.1"] == 1 / 64
        assert ("prototype_collapse" in {a.name for a in monitor.alarms}) == warnings


def test_state_written_before_the_tiers_loads():
    old = {"counters": {}, "fired": {"unused_prototypes": {"name": "unused_prototypes", "step": 3, "value": 0.1,
                                                         "message": "m", "cause": "c", "remedy": "r"}}}
    monitor = AlarmMonitor(8)
    monitor.load_state_dict(old)
    assert isinstance(monitor.fired["unused_prototypes"], Alarm)
    assert monitor.fired["unused_prototypes"].tier == "warning"
    assert monitor.update(5, unused_metrics()) == []        # fired before: not again


def test_the_final_report_warns_on_test_usage_under_its_own_name():
    from nocollapse.diagnostics import format_report, prototype_report, report_warnings

    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(64, 8, generator=g)
    # 200 images whose nearest prototype is one of two: 2 of min(64, 200) used
    nearest = torch.randint(0, 2, (200,), generator=g)
    report = prototype_report(prototypes, nearest=nearest)
    warnings = report_warnings(report)
    assert [w["name"] for w in warnings] == ["unused_prototypes_test"] and warnings[0]["tier"] == "warning"
    assert "unused_prototypes_test" in format_report(report)
    spread = prototype_report(prototypes, nearest=torch.arange(200) % 64)
    assert report_warnings(spread) == [] and "warnings" not in format_report(spread)


def test_uniform_collapse_waits_while_the_assignments_sharpen():
    """A head that starts at ln K entropy and sharpens (CARP's first tens of steps on digits) is
    learning; a teacher that climbs to ln K and stays has collapsed. Hand-made streams within 2 %
    of ln K; only the direction differs."""
    import math

    ln_k = math.log(256)

    def run(entropies, monitor=None):
        monitor = monitor or AlarmMonitor(num_prototypes=256, warmup_steps=0, patience=3, enabled=("uniform_collapse",))
        fired = [a for step, h in enumerate(entropies) for a in monitor.update(step, {"mean_entropy": h})]
        return monitor, fired

    _, fired = run([ln_k - 0.035 - 0.003 * i for i in range(10)])            # falling by 0.003 per check
    assert fired == []
    _, fired = run([ln_k - 0.010 + 0.001 * min(i, 5) for i in range(10)])    # climbing, then flat
    assert [(a.name, a.step) for a in fired] == [("uniform_collapse", 2)]
    # a drop within uniform_falling_tol * ln K (float noise on a plateau) still counts
    _, fired = run([ln_k - 1e-3, ln_k - 1e-3 - 0.5e-4 * ln_k, ln_k - 1e-3 - 1e-4 * ln_k])
    assert [a.step for a in fired] == [2]
    # the previous entropy resumes with the state: a falling stream split across a resume stays quiet
    first, fired = run([ln_k - 0.035 - 0.003 * i for i in range(2)])
    resumed = AlarmMonitor(num_prototypes=256, warmup_steps=0, patience=3, enabled=("uniform_collapse",))
    resumed.load_state_dict(first.state_dict())
    assert resumed.update(2, {"mean_entropy": ln_k - 0.035 - 0.006 - 0.003}) == []
    assert resumed.state_dict()["counters"]["uniform_collapse"] == 0


def test_one_hot_collapse_counts_a_few_prototypes_against_the_batch_size():
    # a batch of 128 sharp samples: max(2, 3 % of min(K, 128)) = 3.84, so 3 arg-max prototypes are a
    # collapse and 4 are not; a batch of 1,024 allows up to 30 (3 % of 1,024 = 30.72)
    def fired(used, n, k=256):
        monitor = AlarmMonitor(k, warmup_steps=0, patience=1)
        return {a.name for a in monitor.update(1, {"argmax_used": used, "num_samples": n, "max_prob": 0.95})}

    assert "one_hot_collapse" in fired(3, 128)
    assert "one_hot_collapse" not in fired(4, 128)
    assert "one_hot_collapse" in fired(30, 1024, k=65536)
    assert "one_hot_collapse" not in fired(31, 1024, k=65536)
    assert "one_hot_collapse" in fired(2, 16)          # never fewer than 2
    # assignments spread over the prototypes (a tie's arg-max) are not one-hot, whatever the count
    monitor = AlarmMonitor(256, warmup_steps=0, patience=1)
    fired_names = {a.name for a in monitor.update(1, {"argmax_used": 1, "num_samples": 128, "max_prob": 0.004})}
    assert "one_hot_collapse" not in fired_names


def test_the_rank_history_starts_at_step_0_and_the_spread_history_after_the_warm_up():
    """A run whose embeddings fall from 60 directions to 2 inside the warm-up is judged against the
    60 (a twentieth of it is 3), while the spread the first steps show (std 0.12, then 0.04 with
    the batch's cosine at 0.95) is not the reference of the representation check: only the
    spread reached after the warm-up is."""
    monitor = AlarmMonitor(warmup_steps=100, patience=3,
                           enabled=("dimensional_collapse", "representation_collapse"))
    early = {"direction_rank": 60.0, "embedding_std": 0.12, "mean_cosine": 0.5, "embedding_dim": 64}
    collapsed = {"direction_rank": 2.0, "embedding_std": 0.04, "mean_cosine": 0.95, "embedding_dim": 64}
    assert monitor.update(0, early) == []
    assert monitor.update(50, collapsed) == []                 # warm-up: recorded, not checked
    fired = [monitor.update(step, collapsed) for step in (100, 110, 120)]
    assert [[a.name for a in f] for f in fired] == [[], [], ["dimensional_collapse"]]
    assert "60.0 they spanned" in fired[2][0].message
    assert monitor.state_dict()["peaks"] == {"direction_rank": 60.0, "embedding_std": 0.04}
    # the same run with the warm-up's rank out of view (a rank already low at step 0) stays quiet
    quiet = AlarmMonitor(warmup_steps=100, patience=3, enabled=("dimensional_collapse",))
    assert [quiet.update(step, collapsed) for step in (0, 100, 110, 120)] == [[], [], [], []]


def test_held_out_images_show_a_collapse_that_the_training_batch_hides():
    """VICReg without its variance term: batch norm in training mode keeps the batch's cosine at
    0.85 while the held-out images in eval mode sit at 0.99. Either view failing counts a check;
    the held-out limit (0.97) is stricter than the batch's (0.92), so a held-out cone of 0.95 that
    a learning DINO head shows does not."""
    monitor = AlarmMonitor(warmup_steps=10, patience=3, enabled=("representation_collapse",))
    start = {"embedding_std": 0.04, "mean_cosine": 0.3, "held_out_embedding_std": 0.04,
             "held_out_mean_cosine": 0.3, "embedding_dim": 64}
    hidden = {"embedding_std": 0.015, "mean_cosine": 0.85, "held_out_embedding_std": 0.003,
              "held_out_mean_cosine": 0.99, "embedding_dim": 64}
    cone = {**hidden, "held_out_embedding_std": 0.015, "held_out_mean_cosine": 0.95}
    assert monitor.update(10, start) == []
    assert [monitor.update(step, hidden) for step in (15, 20)] == [[], []]
    fired = monitor.update(25, hidden)
    assert [a.name for a in fired] == ["representation_collapse"] and "held-out images'" in fired[0].message
    quiet = AlarmMonitor(warmup_steps=10, patience=3, enabled=("representation_collapse",))
    assert [quiet.update(step, s) for step, s in ((10, start), (15, cone), (20, cone), (25, cone), (30, cone))] \
        == [[]] * 5
    # the batch alone still decides where there are no held-out metrics, and neither view -> unmeasured
    batch_only = {k: v for k, v in hidden.items() if not k.startswith("held_out_")}
    assert AlarmMonitor(warmup_steps=0, patience=1)._check_representation({}) is None
    assert AlarmMonitor(warmup_steps=0, patience=1, enabled=("representation_collapse",)).update(
        0, {**batch_only, "mean_cosine": 0.95}) == []           # no peak yet: 0.95 against itself


def test_held_out_rank_has_its_own_history():
    monitor = AlarmMonitor(warmup_steps=10, patience=2, enabled=("dimensional_collapse",))
    monitor.update(0, {"direction_rank": 20.0, "held_out_direction_rank": 60.0})   # warm-up: history only
    assert monitor.update(10, {"direction_rank": 19.0, "held_out_direction_rank": 2.0}) == []
    fired = monitor.update(15, {"direction_rank": 19.0, "held_out_direction_rank": 2.0})
    assert [a.name for a in fired] == ["dimensional_collapse"] and "held-out" in fired[0].message
    assert monitor.state_dict()["peaks"]["held_out_direction_rank"] == 60.0
