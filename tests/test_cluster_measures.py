"""Cluster-level collapse measures, chunked assignment statistics and the handling of fixed
prototypes (a codebook) in the reports and alarms."""

from __future__ import annotations

import math

import pytest
import torch

from nocollapse.diagnostics.alarms import AlarmMonitor
from nocollapse.diagnostics.assignments import AssignmentAccumulator, assignment_stats
from nocollapse.diagnostics.clusters import (
    cluster_size_stats,
    intracluster_variance_ratio,
    minmax_moment_spectrum,
)
from nocollapse.diagnostics.report import format_report, prototype_report


def test_cluster_sizes_by_hand():
    assigned = torch.tensor([3, 3, 3, 1, 1, 7])
    stats = cluster_size_stats(assigned, 10)
    assert stats["used"] == 3 and stats["used_fraction"] == pytest.approx(0.3)
    assert stats["used_fraction_capped"] == pytest.approx(3 / 6)
    assert stats["largest_fraction"] == pytest.approx(0.5)
    assert stats["median_size"] == 2.0 and stats["singletons"] == 1
    share = torch.tensor([0.5, 1 / 3, 1 / 6])
    assert stats["size_perplexity"] == pytest.approx(math.exp(float(-(share * share.log()).sum())))
    one = cluster_size_stats(torch.zeros(5, dtype=torch.long), 4)
    assert one["used"] == 1 and one["size_perplexity"] == pytest.approx(1.0) and one["largest_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cluster_size_stats(torch.tensor([0, 4]), 4)


def test_intracluster_variance_ratio_by_hand():
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0]])
    # total: mean (5.5, 0.5); sum of squared deviations = 30.25+12.25+20.25+20.25 + 0.25*3+2.25 = 86
    # within: cluster {0,1} mean (1,0): 1+1 = 2; cluster {2,3} mean (10,1): 1+1 = 2
    assert intracluster_variance_ratio(h, torch.tensor([0, 0, 1, 1])) == pytest.approx(4 / 86)
    # one cluster keeps all the variance; every sample its own cluster keeps none
    assert intracluster_variance_ratio(h, torch.zeros(4, dtype=torch.long)) == pytest.approx(1.0)
    assert intracluster_variance_ratio(h, torch.arange(4)) == pytest.approx(0.0, abs=1e-12)
    # intracluster collapse: identical members of each cluster
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert intracluster_variance_ratio(collapsed, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="rows"):
        intracluster_variance_ratio(h, torch.tensor([0, 1]))


def test_minmax_moment_spectrum():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(500, 8, generator=gen)
    spectrum = minmax_moment_spectrum(full)
    assert len(spectrum) == 8 and spectrum == sorted(spectrum, reverse=True)
    e = (full - full.min()) / (full.max() - full.min())
    expected = torch.linalg.eigvalsh((e.t() @ e / 500).double()).flip(0)
    assert torch.allclose(torch.tensor(spectrum, dtype=torch.float64), expected, atol=1e-6)
    # scaling and shifting the whole matrix does not change it
    assert torch.allclose(torch.tensor(minmax_moment_spectrum(3 * full + 7)), torch.tensor(spectrum), atol=1e-6)
    # embeddings in a 2-D subspace: all but the top three eigenvalues vanish (the uncentred moment
    # adds the mean direction)
    flat = torch.randn(500, 2, generator=gen) @ torch.randn(2, 8, generator=gen)
    low = minmax_moment_spectrum(flat)
    assert low[3] < 1e-10 * low[0]


def test_accumulated_assignment_stats_equal_the_one_shot_ones():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(100, 12, generator=gen), dim=1)
    acc = AssignmentAccumulator(12)
    picks = torch.cat([acc.add(chunk) for chunk in probs.split(7)])
    assert torch.equal(picks, probs.argmax(1))
    assert acc.stats() == pytest.approx(assignment_stats(probs))


def test_fixed_prototypes_are_reported_without_uniqueness():
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2, (64, 16), generator=gen).float() * 2 - 1
    probs = torch.softmax(torch.randn(30, 64, generator=gen), dim=1)
    report = prototype_report(codes, assignments=assignment_stats(probs), nearest=probs.argmax(1), fixed=True)
    assert report["prototypes_fixed"] is True
    assert "unique_prototypes" not in report and "unique_prototypes_used" not in report
    assert report["nearest_used"] == int(probs.argmax(1).unique().numel())
    assert report["effective_prototypes"] == pytest.approx(assignment_stats(probs)["effective_prototypes"])
    assert "fixed by construction" in format_report(report)
    with pytest.raises(ValueError, match="not both"):
        prototype_report(codes, probs=probs, assignments=assignment_stats(probs))


def test_one_hot_alarm_counts_effective_prototypes_against_the_batch_when_it_is_smaller_than_k():
    # sharp assignments of a batch of 64 over 40 of 16,384 codes: diverse for the batch, not a collapse
    metrics = {"max_prob": 0.999, "effective_prototypes": 40.0, "num_samples": 64, "loss": 5.0}
    monitor = AlarmMonitor(16384, warmup_steps=0, patience=1, enabled=("one_hot_collapse",))
    assert monitor.update(0, metrics) == []
    fired = monitor.update(1, {**metrics, "effective_prototypes": 1.0})
    assert [a.name for a in fired] == ["one_hot_collapse"]


def test_scores_are_computed_in_chunks_without_an_n_by_k_matrix(monkeypatch):
    from nocollapse import analysis
    from nocollapse.config import build_config
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone

    cfg, _ = build_config(overrides=["method.name=cplearn", "data.image_size=8", "model.width_multiplier=0.125",
                                     "cplearn.embedding_dim=16", "cplearn.num_codes=64", "train.batch_size=6"])
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=2).eval()
    h = torch.tanh(torch.randn(50, 16))
    whole = analysis.score_split(method, h, torch.device("cpu"))
    rows_seen = []
    original = method.scores

    def spy(x):
        rows_seen.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(analysis, "SCORE_CHUNK_ENTRIES", 64 * 8)
    monkeypatch.setattr(method, "scores", spy)
    assigned, stats, nearest = analysis.score_split(method, h, torch.device("cpu"))
    assert max(rows_seen) == 8 and sum(rows_seen) == 50
    assert torch.equal(assigned, whole[0]) and torch.equal(nearest, whole[2])
    assert stats == pytest.approx(whole[1])
    assert torch.equal(nearest, (h @ method.codebook).argmax(1))
