"""Online-EM Gaussian mixture (decoupled prototypes): recovery, forgetting, annealing, state,
gradient isolation and distributed parity."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F

from nocollapse.prototypes.gmm import OnlineGMM

from distributed_helpers import run_distributed


def _sphere_mixture(n, centers, spread, gen):
    labels = torch.randint(0, len(centers), (n,), generator=gen)
    x = centers[labels] + spread * torch.randn(n, centers.shape[1], generator=gen)
    return F.normalize(x, dim=1), labels


def _matched_cosines(estimated, true):
    sim = (F.normalize(estimated, dim=1) @ F.normalize(true, dim=1).t()).numpy()
    rows, cols = linear_sum_assignment(-sim)
    return sim[rows, cols]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_online_em_recovers_a_known_mixture_on_the_sphere(seed, covariance):
    gen = torch.Generator().manual_seed(seed)
    k, d = 6, 16
    centers = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    gmm = OnlineGMM(k, d, covariance=covariance, eta=0.05, init="data", seed=seed)
    for step in range(300):
        x, _ = _sphere_mixture(256, centers, 0.08, gen)
        beta = min(1.0, 0.1 + 0.9 * step / 100)
        gmm.em_step(x, beta=beta)
    cos = _matched_cosines(gmm.means, centers)
    assert cos.min() > 0.99, cos
    assert torch.allclose(gmm.weights, torch.full((k,), 1 / k), atol=0.06)
    # the per-dimension variance of the clusters: spread^2 / (1 + spread^2 d) ~ 0.0053 here
    assert 0.002 < gmm.variances.mean().item() < 0.01


@pytest.mark.parametrize("forgetting", ["per_component", "global"])
def test_forgetting_leaves_an_unused_component_in_place(forgetting):
    gen = torch.Generator().manual_seed(0)
    d = 8
    gmm = OnlineGMM(2, d, eta=0.1, forgetting=forgetting, init="random")
    far = F.normalize(torch.randn(d, generator=gen), dim=0)
    target = F.normalize(-far + 0.3 * torch.randn(d, generator=gen), dim=0)
    for k, mean in ((0, target), (1, far)):
        gmm._set_component(torch.tensor([k]), mean[None], torch.full((1, d), 0.01), 0.5)
    gmm._m_step()
    before_mean, before_var = gmm.means[1].clone(), gmm.variances[1].clone()
    for _ in range(100):
        x = F.normalize(target + 0.05 * torch.randn(64, d, generator=gen), dim=1)
        gamma = gmm.em_step(x)
        assert gamma[:, 1].max() < 1e-6  # the far component receives nothing
    assert torch.allclose(gmm.means[1], before_mean, atol=1e-5)
    assert torch.allclose(gmm.variances[1], before_var, atol=1e-6)
    if forgetting == "per_component":
        # its statistics are untouched; its weight only shrinks relative to the used component,
        # whose mass s0 converges to the full batch mass 1: pi_1 = 0.5 / (0.5 + 1)
        assert gmm.s0[1].item() == pytest.approx(0.5, abs=1e-7)
        assert torch.exp(gmm.log_weights[1]).item() == pytest.approx(1 / 3, abs=1e-4)
    else:
        assert torch.exp(gmm.log_weights[1]).item() < 1e-3
    # the weights the reports read follow the data: the idle component's decays away either way
    assert gmm.weights[1].item() < 1e-3 and gmm.weights.sum().item() == pytest.approx(1.0)


def test_annealing_at_small_beta_spreads_responsibility():
    gen = torch.Generator().manual_seed(0)
    k, d = 64, 32
    gmm = OnlineGMM(k, d, init="random")
    x = F.normalize(torch.randn(128, d, generator=gen), dim=1)

    def mean_entropy(beta):
        g = gmm.responsibilities(x, beta)
        return -(g * torch.log(g.clamp_min(1e-30))).sum(1).mean().item()

    hot, warm, cold = mean_entropy(1e-3), mean_entropy(0.1), mean_entropy(1.0)
    assert cold < warm < hot
    assert hot == pytest.approx(math.log(k), rel=0.01)
    assert cold < 0.5 * math.log(k)


def test_log_joint_matches_a_direct_gaussian_density():
    gen = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(5, 3, init="random", chunk_size=2)
    gmm.variances.copy_(torch.rand(5, 3, generator=gen) * 0.1 + 0.01)
    gmm.log_weights.copy_(torch.log_softmax(torch.randn(5, generator=gen), 0))
    x = torch.randn(4, 3, generator=gen)
    expected = torch.stack([
        torch.distributions.Normal(gmm.means[k], gmm.variances[k].sqrt()).log_prob(x).sum(1)
        + gmm.log_weights[k] for k in range(5)], dim=1)
    assert torch.allclose(gmm.log_joint(x), expected, atol=1e-4)


def test_chunking_over_k_does_not_change_the_update():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    a, b = OnlineGMM(40, 8, chunk_size=40, init="random"), OnlineGMM(40, 8, chunk_size=7, init="random")
    for _ in range(3):
        a.em_step(x, 0.5)
        b.em_step(x, 0.5)
    for name, buf in a.state_dict().items():
        assert torch.allclose(buf.float(), b.state_dict()[name].float(), atol=1e-6), name


def test_data_initialisation_seeds_components_in_order_from_embeddings():
    gen = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(10, 4, init="data")
    first = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    gmm.em_step(first)
    assert gmm.seeded == 6
    second = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    gmm.em_step(second)
    assert gmm.seeded == 10


def test_dead_component_reseeding_is_counted():
    gen = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(4, 4, init="random", reseed_dead=True, dead_threshold=0.5, forgetting="global", eta=0.5)
    x = F.normalize(torch.randn(1, 4, generator=gen), dim=1).repeat(32, 1)
    for _ in range(5):
        gmm.em_step(x)
    assert int(gmm.num_reseeds) > 0


def test_stale_seeds_are_detected_by_usage_and_moved_onto_the_data():
    # Seeds placed where a random encoder put its embeddings; the embeddings then move to two
    # far-away clusters. With per-component forgetting the unused seeds keep their weight, so only
    # their usage reveals them; re-seeding moves them onto the data, each onto a distinct point.
    gen = torch.Generator().manual_seed(0)
    dim, k = 8, 16
    cone = F.normalize(torch.randn(k, dim, generator=gen) * 0.1 + torch.eye(dim)[0], dim=1)
    centres = F.normalize(torch.stack([-torch.eye(dim)[0] + torch.eye(dim)[1], -torch.eye(dim)[0] - torch.eye(dim)[1]]), dim=1)

    def batch():
        idx = torch.randint(0, 2, (64,), generator=gen)
        return F.normalize(centres[idx] + 0.05 * torch.randn(64, dim, generator=gen), dim=1)

    def run(reseed: bool) -> OnlineGMM:
        torch.manual_seed(0)
        gmm = OnlineGMM(k, dim, init="data", eta=0.1, reseed_dead=reseed, dead_threshold=0.2)
        gmm.em_step(cone)                      # seeds: the "random encoder" embeddings
        for _ in range(40):
            gmm.em_step(batch())
        return gmm

    stale, fresh = run(False), run(True)
    data = batch()
    near = lambda g: (g.means @ data.t()).max(dim=1).values  # best cosine of each mean to the data
    # without re-seeding most seeds stay in the cone; the statistics' weights look healthy, the
    # weights that follow the data (what reports read) show them idle
    assert int((near(stale) < 0.5).sum()) >= k - 4
    assert float(torch.exp(stale.log_weights).min()) > 0.5 / k
    assert int((stale.weights < 0.1 / k).sum()) >= k - 4
    assert stale.dead_components().numel() >= k - 4 and int(stale.num_reseeds) == 0
    # with re-seeding every mean ends up on the data, and none is a copy of another
    assert bool((near(fresh) > 0.9).all()) and int(fresh.num_reseeds) >= k - 4
    cos = fresh.means @ fresh.means.t() - 2 * torch.eye(k)
    assert float(cos.max()) < 1 - 1e-6


def test_usage_is_restored_for_checkpoints_written_before_it_existed():
    gmm = OnlineGMM(8, 4, init="random")
    state = {key: value for key, value in gmm.state_dict().items() if key != "usage"}
    fresh = OnlineGMM(8, 4, init="random")
    fresh.usage.fill_(0.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.usage, torch.ones(8))


def test_mixture_state_survives_a_checkpoint_round_trip(tmp_path):
    from nocollapse.utils.checkpoint import atomic_save

    gen = torch.Generator().manual_seed(0)
    a = OnlineGMM(16, 8, init="data")
    for _ in range(3):
        a.em_step(F.normalize(torch.randn(8, 8, generator=gen), dim=1), 0.5)
    atomic_save({"gmm": a.state_dict()}, tmp_path / "g.pt")
    b = OnlineGMM(16, 8, init="data", seed=123)
    b.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True)["gmm"])
    x = F.normalize(torch.randn(8, 8, generator=gen), dim=1)
    assert torch.equal(a.em_step(x, 0.7), b.em_step(x, 0.7))
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="covariance"):
        OnlineGMM(4, 4, covariance="full")
    with pytest.raises(ValueError, match="eta"):
        OnlineGMM(4, 4, eta=0.0)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        OnlineGMM(4, 4).em_step(torch.randn(3, 5))


# ---- distributed parity -------------------------------------------------------------------

def _batches(seed, steps, n, d):
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=gen), dim=1) for _ in range(steps)]


def _gmm_ranked(rank, world_size, init):
    gmm = OnlineGMM(24, 8, init=init, eta=0.2)
    gammas = []
    for x in _batches(0, 4, 20, 8):
        part = x.chunk(world_size)[rank]
        gammas.append(gmm.em_step(part, 0.5))
    return {"state": gmm.state_dict(), "gammas": gammas}


@pytest.mark.distributed
@pytest.mark.parametrize("init", ["data", "random"])
def test_two_processes_hold_the_mixture_of_one_process_on_the_joined_batch(init):
    single = _gmm_ranked(0, 1, init)
    ranks = run_distributed(_gmm_ranked, 2, args=(init,))
    for r, result in enumerate(ranks):
        for name, buf in single["state"].items():
            assert torch.allclose(result["state"][name].float(), buf.float(), atol=1e-5), (r, name)
    for step in range(4):
        joined = torch.cat([ranks[0]["gammas"][step], ranks[1]["gammas"][step]])
        assert torch.allclose(joined, single["gammas"][step], atol=1e-5)


def _gmm_with_buffer(rank, world_size):
    gmm = OnlineGMM(12, 8, init="data", eta=0.2, buffer_size=24, dead_threshold=0.5)
    for x in _batches(3, 4, 12, 8):
        gmm.em_step(x.chunk(world_size)[rank], 0.5)
    placed = [gmm.reseed_from_buffer("all")]
    for x in _batches(4, 3, 12, 8):
        gmm.em_step(x.chunk(world_size)[rank], 1.0)
    placed.append(gmm.reseed_from_buffer("idle"))
    return {"state": gmm.state_dict(), "placed": placed}


@pytest.mark.distributed
def test_buffer_seeding_and_refresh_are_identical_on_every_rank():
    single = _gmm_with_buffer(0, 1)
    assert single["placed"][0] == 12
    ranks = run_distributed(_gmm_with_buffer, 2)
    for r, result in enumerate(ranks):
        assert result["placed"] == single["placed"]
        for name, buf in single["state"].items():
            assert torch.allclose(result["state"][name].float(), buf.float(), atol=1e-5), (r, name)


# ---- weights that follow the data, two-phase updates, autocast ------------------------------

def test_idle_components_lose_their_weight():
    """4 live clusters and 252 idle components: with per-component forgetting the statistics keep
    the idle components' share of S0; the weights the reports read (the occupancy) do not."""
    gen = torch.Generator().manual_seed(0)
    k, d = 256, 16
    centres = F.normalize(torch.randn(4, d, generator=gen), dim=1)
    gmm = OnlineGMM(k, d, init="random", eta=0.05, seed=1)
    gmm._set_component(torch.arange(4), centres, torch.full((4, d), 0.01), 1.0 / k)
    gmm._m_step()
    for _ in range(300):
        x, _ = _sphere_mixture(128, centres, 0.05, gen)
        gmm.em_step(x)
    live = torch.zeros(k, dtype=torch.bool)
    live[:4] = True
    assert float(torch.exp(gmm.log_weights)[~live].sum()) > 0.3       # the statistics keep a share
    assert float(gmm.weights[~live].sum()) < 0.01                    # the data-following weights not
    assert gmm.weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    perplexity = math.exp(-(gmm.weights * torch.log(gmm.weights.clamp_min(1e-30))).sum().item())
    assert perplexity < 5


def test_estep_can_use_the_occupancy():
    gmm = OnlineGMM(4, 3, init="random", estep_weights="occupancy")
    gmm.occupancy.copy_(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    h = F.normalize(torch.randn(5, 3), dim=1)
    plain = OnlineGMM(4, 3, init="random")
    shift = gmm.log_joint(h) - plain.log_joint(h)
    assert torch.allclose(shift, torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1])) + math.log(4), atol=1e-5)


@pytest.mark.parametrize("reseed_dead", [False, True])
def test_propose_changes_nothing_until_commit(reseed_dead):
    # seeded in the first step: the second one reads the mixture's own K x D tensors (no copies)
    gen = torch.Generator().manual_seed(0)
    gmm = OnlineGMM(8, 4, init="data", eta=0.2, buffer_size=16, reseed_dead=reseed_dead, dead_threshold=0.5)
    gmm.em_step(F.normalize(torch.randn(16, 4, generator=gen), dim=1))
    assert int(gmm.num_seeded) == 8
    before = {k: v.clone() for k, v in gmm.state_dict().items()}
    x = F.normalize(torch.randn(16, 4, generator=gen), dim=1)
    gamma, means, update = gmm.propose(x)
    assert torch.equal(means, before["means"])                      # targets against the current means
    assert all(torch.equal(v, before[k]) for k, v in gmm.state_dict().items())
    gmm.apply(update)
    assert not torch.equal(gmm.means, before["means"]) and int(gmm.num_updates) == 2
    twin = OnlineGMM(8, 4, init="data", eta=0.2, buffer_size=16, reseed_dead=reseed_dead, dead_threshold=0.5)
    twin.load_state_dict(before)
    assert torch.allclose(twin.em_step(x), gamma)
    assert all(torch.allclose(v.float(), gmm.state_dict()[k].float()) for k, v in twin.state_dict().items())


def test_the_update_under_cpu_bf16_autocast_equals_fp32():
    """At the variance floor log-likelihoods differ by tens of nats: bf16 would break them, so the
    mixture update runs with autocast disabled, whatever the caller's autocast."""
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 32, generator=gen), dim=1)
    batches = [_sphere_mixture(64, centres, 0.003, gen)[0] for _ in range(30)]
    ref = OnlineGMM(6, 32, init="data", eta=0.5, var_floor=1e-4)
    amp = OnlineGMM(6, 32, init="data", eta=0.5, var_floor=1e-4)
    for x in batches:
        g_ref = ref.em_step(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g_amp = amp.em_step(x)
        assert g_amp.dtype == torch.float32 and torch.allclose(g_amp, g_ref, atol=1e-5)
    assert float(ref.variances.min()) <= 2e-4                         # at the floor
    for name, value in ref.state_dict().items():
        assert torch.allclose(amp.state_dict()[name].float(), value.float(), atol=1e-5), name


def test_buffer_seeding_follows_the_data_after_a_drift():
    """Seeds from a random encoder's cone; the data drift to 8 clusters elsewhere. Without the buffer
    few components are used; re-seeding on the buffer after the drift places them on the data."""
    gen = torch.Generator().manual_seed(0)
    k, d = 32, 16
    cone = F.normalize(torch.randn(k, d, generator=gen) * 0.05 + torch.eye(d)[0], dim=1)
    centres = F.normalize(torch.randn(8, d, generator=gen) - 2 * torch.eye(d)[0], dim=1)

    def run(buffer: bool) -> OnlineGMM:
        gmm = OnlineGMM(k, d, init="data", eta=0.1, buffer_size=4 * k if buffer else 0, seed=3)
        gmm.em_step(cone)
        for _ in range(20):
            gmm.em_step(_sphere_mixture(64, centres, 0.1, gen)[0])
        if buffer:
            assert gmm.reseed_from_buffer("all") == k and int(gmm.num_buffer_seedings) == 1
        for _ in range(10):
            gmm.em_step(_sphere_mixture(64, centres, 0.1, gen)[0])
        return gmm

    test, labels = _sphere_mixture(2000, centres, 0.1, gen)
    used = lambda g: torch.unique((test @ g.means.t()).argmax(1)).numel()
    stale, fresh = run(False), run(True)
    assert used(fresh) >= 0.75 * k and used(stale) <= 0.5 * k
    cos = fresh.means @ fresh.means.t() - 2 * torch.eye(k)
    assert float(cos.max()) < 1 - 1e-4                                 # no duplicated component
    # the buffer and its position are part of the state
    twin = OnlineGMM(k, d, init="data", eta=0.1, buffer_size=4 * k, seed=3)
    twin.load_state_dict(fresh.state_dict())
    assert torch.equal(twin.buffered(), fresh.buffered()) and int(twin.buffer_filled) == 4 * k


def test_refresh_replaces_only_idle_components():
    gen = torch.Generator().manual_seed(0)
    k, d = 16, 8
    centres = F.normalize(torch.randn(4, d, generator=gen), dim=1)
    gmm = OnlineGMM(k, d, init="data", eta=0.2, buffer_size=64, dead_threshold=0.3, seed=0)
    for _ in range(30):
        gmm.em_step(_sphere_mixture(32, centres, 0.05, gen)[0])
    idle = gmm.idle_mask()
    assert 0 < int(idle.sum()) < k
    live_means = gmm.means[~idle].clone()
    assert gmm.reseed_from_buffer("idle") == int(idle.sum())
    assert torch.equal(gmm.means[~idle], live_means)
    assert not bool(gmm.idle_mask().any())


def test_a_buffer_smaller_than_the_mixture_is_rejected():
    with pytest.raises(ValueError, match="buffer_size"):
        OnlineGMM(16, 4, buffer_size=8)


# --------------------------------------------------------------------------- the blocked rewrite
def _trained_mixture(covariance, steps=3, k=24, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gmm = OnlineGMM(k, d, covariance=covariance, init="random", eta=0.3, chunk_size=10, seed=seed)
    for _ in range(steps):
        gmm.em_step(torch.randn(40, d, generator=gen))
    return gmm, gen


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_responsibilities_equal_the_annealed_posterior_by_the_formula(row_block_elements, covariance, beta):
    gmm, gen = _trained_mixture(covariance)
    h = F.normalize(torch.randn(30, gmm.dim, generator=gen), dim=1)
    hd, mu, var = h.double(), gmm.means.double(), gmm.variances.double()
    log_normal = -0.5 * (((hd[:, None, :] - mu[None]) ** 2 / var[None]).sum(-1)
                         + torch.log(var).sum(-1)[None] + gmm.dim * math.log(2 * math.pi))
    expected = torch.softmax(beta * (gmm.log_weights.double()[None] + log_normal), dim=1)
    expected = expected.masked_fill(expected < 1e-20, 0.0).float()
    torch.testing.assert_close(gmm.responsibilities(h, beta), expected)


@pytest.mark.parametrize("covariance", ["diagonal", "isotropic"])
def test_blocked_m_step_equals_the_whole_matrix_form(row_block_elements, covariance):
    gmm, _ = _trained_mixture(covariance)
    s0 = gmm.s0.clamp_min(1e-30)
    m = gmm.s1 / s0[:, None]
    mu = F.normalize(m, dim=1)
    var = gmm.s2 / s0[:, None] - 2 * mu * m + mu * mu
    if covariance == "isotropic":
        var = var.mean(1, keepdim=True).expand_as(var)
    gmm._m_step()
    torch.testing.assert_close(gmm.means, mu)
    torch.testing.assert_close(gmm.variances, var.clamp_min(gmm.var_floor))
    torch.testing.assert_close(gmm.log_weights, torch.log(s0 / s0.sum()))
