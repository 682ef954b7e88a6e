"""The sampled unique-prototype estimate (diagnostics/prototypes.py, "Large K").

Each sampled row must get the status the exact greedy cover gives it, so the estimate is
``K x / m`` with ``x`` counted against a row-by-row reference; the standard error is the
stated formula; the automatic choice, the fallback to the exact cover and the monitor's keys
behave as documented.
"""

from __future__ import annotations

import math

import pytest
import torch

from nocollapse.diagnostics.monitor import CollapseMonitor
from nocollapse.diagnostics.prototypes import (
    EXACT_MAX_ROWS,
    STANDARD_EPS,
    prototype_geometry,
    unique_estimate,
    unique_prototypes,
)


def representative_mask(prototypes: torch.Tensor, eps: float) -> torch.Tensor:
    """Row by row in float64: True where the greedy cover makes the row a representative."""
    u = prototypes.double()
    norms = u.norm(dim=1, keepdim=True)
    u = u / torch.where(norms > 0, norms, torch.ones_like(norms))
    covered = torch.zeros(u.shape[0], dtype=torch.bool)
    reps = torch.zeros(u.shape[0], dtype=torch.bool)
    for i in range(u.shape[0]):
        if covered[i]:
            continue
        reps[i] = True
        covered |= (1.0 - u @ u[i]) < eps
    return reps


def sampled_rows(num: int, m: int, seed: int) -> torch.Tensor:
    """The rows the estimate draws (as the module doc states: a seeded permutation's first m)."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed))[:m]


def clustered(num: int, dim: int, clusters: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    members = torch.randint(0, clusters, (num,), generator=g)
    return centres[members] + spread * torch.randn(num, dim, generator=g)


def chain(num: int, step_angle: float) -> torch.Tensor:
    """Unit vectors on a great circle, each ``step_angle`` from the next (a chain of ε-links)."""
    angles = torch.arange(num, dtype=torch.float64) * step_angle
    return torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(num, dtype=torch.float64)], 1)


CASES = {
    # tight clusters: the sampled rows are settled by their cluster's first row
    "tight clusters": lambda: clustered(1500, 16, 40, 0.02, 0),
    # clusters about ε wide: many rows are near the threshold, the representatives interleave
    "loose clusters": lambda: clustered(1500, 8, 60, 0.35, 1),
    # healthy: every row its own representative at the small ε
    "healthy": lambda: torch.randn(1500, 32, generator=torch.Generator().manual_seed(2)),
    # shuffled copies of a few directions, plus zero rows (distance 1 to everything)
    "copies and zeros": lambda: torch.cat([
        torch.randn(12, 10, generator=torch.Generator().manual_seed(3)).repeat(100, 1),
        torch.zeros(30, 10)])[torch.randperm(1230, generator=torch.Generator().manual_seed(4))],
}


@pytest.mark.parametrize("max_extra_cost", [1.0, 100.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_sampled_row_has_its_exact_status(case, max_extra_cost):
    # at the default cap, a small K may fall back to the exact cover for some ε; with a generous
    # cap every ε is settled from the sample, and each status must be the exact one
    prototypes = CASES[case]()
    num, m, seed = prototypes.shape[0], 200, 7
    eps_list = [*STANDARD_EPS, 0.8]
    est = unique_estimate(prototypes, eps_list, exact=False, sample_rows=m, seed=seed,
                          max_extra_cost=max_extra_cost)
    rows = sampled_rows(num, m, seed)
    assert est.sampled_rows == (0 if all(est.exact.values()) else m)
    if max_extra_cost > 1:
        assert not any(est.exact.values())
    for eps in eps_list:
        reps = int(representative_mask(prototypes, eps)[rows].sum())
        if est.exact[eps]:       # fell back to the exact cover: then it must be the exact count
            assert est.counts[eps] == sum(representative_mask(prototypes, eps))
            continue
        assert est.counts[eps] == pytest.approx(num * reps / m, abs=1e-9), (case, eps)
        assert est.fractions[eps] == pytest.approx(reps / m, abs=1e-12)
        adjusted = (reps + 2) / (m + 4)
        expected_se = math.sqrt(adjusted * (1 - adjusted) / m * (num - m) / (num - 1))
        assert est.stderr[eps] == pytest.approx(expected_se, rel=1e-12)


def test_a_chain_is_settled_exactly_or_covered_exactly():
    # each row within ε of the next, not of the one after: row j is a representative iff j is
    # even, and every sampled row needs the whole chain before it to be settled
    eps = 0.1
    step = 0.6 * math.acos(1 - eps)
    links = chain(1200, step)
    est = unique_estimate(links, [eps], exact=False, sample_rows=100, seed=3)
    reps = representative_mask(links, eps)
    if est.exact[eps]:
        assert est.counts[eps] == int(reps.sum()) and est.stderr[eps] == 0.0
    else:
        rows = sampled_rows(1200, 100, 3)
        assert est.counts[eps] == pytest.approx(1200 * int(reps[rows].sum()) / 100)
    # with no extra work allowed, the recursion gives up and the exact cover answers
    capped = unique_estimate(links, [eps], exact=False, sample_rows=100, seed=3, max_extra_cost=0.0)
    assert capped.exact[eps] and capped.counts[eps] == int(reps.sum()) and capped.stderr[eps] == 0.0
    assert capped.sampled_rows == 0


def test_the_estimate_is_unbiased_over_seeds():
    prototypes = clustered(2000, 8, 300, 0.2, 5)
    eps = 0.1
    exact = float(representative_mask(prototypes, eps).float().mean())
    estimates = [unique_estimate(prototypes, [eps], exact=False, sample_rows=250, seed=s, max_extra_cost=100.0)
                 for s in range(12)]
    assert not any(e.exact[eps] for e in estimates)
    mean = sum(e.fractions[eps] for e in estimates) / len(estimates)
    se_of_mean = estimates[0].stderr[eps] / math.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * se_of_mean + 1e-3
    # each estimate within 4 of its own standard errors of the truth
    assert all(abs(e.fractions[eps] - exact) <= 4 * e.stderr[eps] for e in estimates)


def test_automatic_choice_and_reproducibility():
    small = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    auto = unique_estimate(small)
    assert all(auto.exact.values()) and auto.sampled_rows == 0
    assert auto.counts == {e: float(c) for e, c in unique_prototypes(small).items()}
    # above max_exact on the CPU: sampled, and the same rows on every call with one seed
    first = unique_estimate(small, max_exact=100, sample_rows=64, seed=1)
    again = unique_estimate(small, max_exact=100, sample_rows=64, seed=1)
    assert first.sampled_rows == 64 and first == again
    # a sample as large as K is the exact cover
    assert all(unique_estimate(small, exact=False, sample_rows=300).exact.values())
    # unique_prototypes stays exact by default whatever K, and rounds a sampled count
    one_eps = unique_estimate(small, [0.1], max_exact=100, sample_rows=64, seed=1)
    assert unique_prototypes(small, [0.1], exact=None, max_exact=100, sample_rows=64, seed=1)[0.1] == \
        round(one_eps.counts[0.1])
    assert EXACT_MAX_ROWS >= 2048


def test_bad_options_are_refused():
    p = torch.randn(10, 4)
    for kwargs in ({"sample_rows": 0}, {"max_exact": -1}, {"max_extra_cost": float("nan")},
                   {"neighbour_segment": 0}, {"block_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            unique_estimate(p, **kwargs)


def test_geometry_and_monitor_say_when_a_figure_is_sampled(tmp_path):
    prototypes = torch.randn(1000, 16, generator=torch.Generator().manual_seed(9))
    exact = prototype_geometry(prototypes)
    assert exact["unique_sampled_rows"] == 0 and "unique_0.1_stderr" not in exact
    assert exact["unique_0.1"] == unique_prototypes(prototypes, [0.1])[0.1] / 1000
    sampled = prototype_geometry(prototypes, max_exact=100, sample_rows=200)
    assert sampled["unique_sampled_rows"] == 200
    assert set(f"unique_{e:g}_stderr" for e in STANDARD_EPS) <= sampled.keys()
    assert abs(sampled["unique_0.1"] - exact["unique_0.1"]) <= 4 * sampled["unique_0.1_stderr"] + 1e-12
    # the monitor's end_epoch writes the same keys as the geometry function
    monitor = CollapseMonitor(num_prototypes=1000, log_dir=tmp_path, tensorboard=False)
    metrics = monitor.end_epoch(step=1, prototypes=prototypes)
    assert metrics["unique_0.1"] == exact["unique_0.1"] and metrics["unique_sampled_rows"] == 0
    assert metrics["pairwise_cosine_max"] == pytest.approx(exact["pairwise_cosine_max"])
