"""alpha-ReQ and LiDAR: hand-built spectra, properties, the written-out LiDAR formula, and a
cross-check of alpha-ReQ against the reptrix package (skipped when it is not installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nocollapse.diagnostics import alpha_req, lidar


def _power_law(alpha: float, n: int = 20000, d: int = 200, seed: int = 0) -> torch.Tensor:
    """Gaussian embeddings whose covariance eigenvalues are i^(-alpha)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scales


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_the_decay_of_a_power_law(alpha):
    result = alpha_req(_power_law(alpha))
    assert result["alpha"] == pytest.approx(alpha, abs=0.03) and result["r2"] > 0.99


def test_alpha_req_is_scale_free_and_refuses_too_few_eigenvalues():
    z = _power_law(1.0, n=4000)
    assert alpha_req(7.0 * z)["alpha"] == pytest.approx(alpha_req(z)["alpha"], abs=1e-9)
    with pytest.raises(ValueError, match="at least 3 non-zero eigenvalues"):
        alpha_req(torch.randn(50, 5))           # only 5 eigenvalues, the fit starts at rank 10
    assert alpha_req(torch.randn(500, 40), fit_range=(2, 30))["alpha"] < 0.5   # flat, noise-like


def test_alpha_req_matches_reptrix():
    reptrix_alpha = pytest.importorskip("reptrix.alpha")
    z = _power_law(1.4).float()
    theirs = reptrix_alpha.get_alpha(z, fit_range=np.arange(10, 100))[0]
    assert alpha_req(z)["alpha"] == pytest.approx(float(theirs), abs=1e-3)


def _lidar_reference(views: torch.Tensor, delta: float) -> float:
    """The formula with explicit loops over samples and views."""
    z = views.double()
    n, q, d = z.shape
    means = [z[i].mean(0) for i in range(n)]
    grand = sum(means) / n
    between = sum(torch.outer(m - grand, m - grand) for m in means) / n
    within = sum(torch.outer(z[i, j] - means[i], z[i, j] - means[i]) for i in range(n) for j in range(q)) / (n * q)
    within = within + delta * torch.eye(d, dtype=torch.float64)
    w_inv_sqrt = torch.linalg.inv(torch.linalg.cholesky(within)).t()   # W^{-1} = L^-T L^-1: same spectrum
    lam = torch.linalg.eigvalsh(w_inv_sqrt.t() @ between @ w_inv_sqrt).clamp_min(0)
    p = lam / lam.sum() + 1e-7
    return math.exp(float(-(p * p.log()).sum()))


def test_lidar_equals_the_written_out_formula():
    gen = torch.Generator().manual_seed(1)
    views = torch.randn(30, 1, 6, generator=gen) + 0.3 * torch.randn(30, 3, 6, generator=gen)
    assert lidar(views) == pytest.approx(_lidar_reference(views, 1e-6), rel=1e-6)


def test_lidar_counts_the_directions_that_separate_samples():
    gen = torch.Generator().manual_seed(2)
    d = 16
    # samples spread isotropically, views jitter isotropically: every direction separates
    full = torch.randn(2000, 1, d, generator=gen) + 0.1 * torch.randn(2000, 4, d, generator=gen)
    assert lidar(full) > 0.95 * d
    # samples differ along 3 directions only; the views jitter in all 16
    low = torch.zeros(2000, 1, d)
    low[:, :, :3] = torch.randn(2000, 1, 3, generator=gen)
    low = low + 0.1 * torch.randn(2000, 4, d, generator=gen)
    assert 2.5 < lidar(low) < 4.5
    # N - 1 < D caps it
    few = torch.randn(5, 1, d, generator=gen) + 0.1 * torch.randn(5, 4, d, generator=gen)
    assert lidar(few) <= 4.0 + 1e-6
    with pytest.raises(ValueError, match="q >= 2"):
        lidar(torch.randn(10, 1, d))


def test_lidar_is_blind_to_representation_collapse_and_embedding_std_is_not():
    """The documented blind spot: every sample at nearly one point, its views isotropic noise
    around it. LiDAR counts the directions in which samples differ more than their views, at any
    scale, so it reads like a healthy embedding's; the per-dimension spread shows the collapse."""
    from nocollapse.diagnostics import embedding_std

    g = torch.Generator().manual_seed(0)
    n, q, d = 400, 4, 16
    healthy_samples = torch.randn(n, 1, d, generator=g)
    healthy = healthy_samples + 0.3 * torch.randn(n, q, d, generator=g)
    point = torch.ones(1, 1, d)
    collapsed_samples = point + 1e-3 * torch.randn(n, 1, d, generator=g)
    collapsed = collapsed_samples + 3e-4 * torch.randn(n, q, d, generator=g)
    assert lidar(collapsed) > 0.8 * lidar(healthy)
    assert embedding_std(collapsed[:, 0]) < 0.01 * embedding_std(healthy[:, 0])
