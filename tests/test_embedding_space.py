"""The space decoupled prototypes are fitted in (prototypes/space.py, ``gmm.space``).

Embeddings in a narrow cone (the stock DINO head without batch norm) put every mixture mean
inside the cone; whitening removes what all embeddings share, so the means stay distinct.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_distributed
from nocollapse import DecoupledPrototypes
from nocollapse.diagnostics import unique_fraction
from nocollapse.prototypes import SPACES, EmbeddingSpace


def cone(n: int, d: int = 16, clusters: int = 8, spread: float = 0.08, seed: int = 0) -> torch.Tensor:
    """Unit vectors around ``clusters`` directions, all of them within a narrow cone around one
    common direction (mean-direction norm about 0.97)."""
    fixed = torch.Generator().manual_seed(1234)          # one cone and one set of clusters
    axis = F.normalize(torch.randn(d, generator=fixed), dim=0)
    centres = axis + 0.12 * F.normalize(torch.randn(clusters, d, generator=fixed), dim=1)
    members = torch.arange(n) % clusters
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return F.normalize(centres[members] + spread * 0.12 * noise, dim=1)


def mean_direction_norm(z: torch.Tensor) -> float:
    return float(F.normalize(z, dim=1).mean(0).norm())


def test_the_sphere_is_the_identity_and_keeps_no_statistics():
    space = EmbeddingSpace(16, "sphere")
    z = cone(32)
    assert space.propose(z) is None and torch.equal(space(z), z)
    before = {k: v.clone() for k, v in space.state_dict().items()}
    space.apply(space.propose(z))
    assert all(torch.equal(v, before[k]) for k, v in space.state_dict().items())


def test_whitening_opens_the_cone_and_standardising_and_centring_are_weaker():
    z = cone(512, spread=1.0)
    assert mean_direction_norm(z) > 0.85
    opened = {}
    for name in ("centered", "standardized", "whitened"):
        space = EmbeddingSpace(16, name)
        space.apply(space.propose(z))
        opened[name] = space(z)
        assert mean_direction_norm(opened[name]) < 0.1     # the shared mean is gone
    # whitened: the covariance of the transformed rows before normalising is close to the identity
    space = EmbeddingSpace(16, "whitened", shrinkage=1e-6)
    space.apply(space.propose(z))
    centred = (z - space.mean.float()) @ space.transform_matrix
    cov = centred.t() @ centred / z.shape[0]
    assert torch.allclose(cov, torch.eye(16), atol=1e-3)


def test_running_statistics_follow_the_momentum():
    space = EmbeddingSpace(4, "centered", momentum=0.75)
    a, b = torch.ones(3, 4), -torch.ones(5, 4)
    space.apply(space.propose(a))          # the first batch sets the statistics
    assert torch.allclose(space.mean, torch.ones(4, dtype=torch.float64))
    space.apply(space.propose(b))          # then m <- m + (1 - momentum) (batch mean - m)
    assert torch.allclose(space.mean, torch.full((4,), 0.5, dtype=torch.float64))
    assert int(space.updates) == 2


@pytest.mark.parametrize("space", ["sphere", "whitened"])
def test_decoupled_means_stay_distinct_in_a_cone_only_in_the_whitened_space(space):
    protos = DecoupledPrototypes(8, 16, space=space)
    batches = [cone(256, seed=s) for s in range(30)]
    for step, x in enumerate(batches):
        protos.update(x, step)
        protos.commit()
    unique = unique_fraction(protos.means, [0.1])[0.1]
    if space == "sphere":
        assert unique <= 0.25       # every mean inside the cone: one or two directions
    else:
        assert unique == 1.0
        # and the data use the means: every cluster's arg-max is a different one
        winners = protos(cone(64, seed=99)).argmax(1).view(8, 8)    # [repeat, cluster]
        assert len(set(winners[0].tolist())) >= 6


def test_a_step_proposes_and_only_commit_writes_the_statistics():
    protos = DecoupledPrototypes(4, 16)                   # whitened by default
    first = cone(64, seed=1)
    protos.update(first, step=0)
    # the first step scores with its own batch's statistics, before any are written
    assert int(protos.embedding_space.updates) == 0
    assert mean_direction_norm(protos.embedding_space(first, protos._pending_space)) < 0.1
    protos.discard()
    assert int(protos.embedding_space.updates) == 0 and torch.equal(protos.embedding_space.mean, torch.zeros(16, dtype=torch.float64))
    protos.update(first, step=0)
    protos.commit()
    mean_after_commit = protos.embedding_space.mean.clone()
    assert int(protos.embedding_space.updates) == 1 and not torch.equal(mean_after_commit, torch.zeros(16, dtype=torch.float64))
    protos.update(cone(64, seed=2), step=1)
    protos.discard()                                     # a skipped step: the space is as it was
    assert torch.equal(protos.embedding_space.mean, mean_after_commit)


def test_gradients_flow_through_the_map_into_the_student():
    protos = DecoupledPrototypes(4, 16)
    protos.update(cone(64), step=0)
    z = cone(8, seed=3).requires_grad_()
    protos(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and list(protos.parameters()) == []


def test_under_bf16_autocast_the_map_and_the_mixture_stay_in_float32():
    x = cone(128, spread=1.0, seed=4)
    fp32 = DecoupledPrototypes(8, 16, seed=0)
    gamma32 = fp32.update(x, step=0)
    scores32 = fp32(x[:16])
    autocast = DecoupledPrototypes(8, 16, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gamma16 = autocast.update(x, step=0)
        mapped = autocast.embedding_space(x, autocast._pending_space)
        scores16 = autocast(x[:16])
    assert mapped.dtype == torch.float32
    assert torch.allclose(gamma16, gamma32, atol=1e-5)
    # the final score matmul may run in bf16 under autocast (as a learned layer would); the map
    # before it is exact, so the scores differ by bf16 rounding only
    assert torch.allclose(scores16.float(), scores32, atol=2e-2)


def test_checkpoints_written_before_the_space_load_into_a_sphere_and_are_refused_elsewhere():
    old = DecoupledPrototypes(4, 16, space="sphere")
    old.update(cone(64), step=0)
    old.commit()
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("embedding_space.")}
    sphere = DecoupledPrototypes(4, 16, space="sphere")
    sphere.load_state_dict(dict(state))
    assert torch.equal(sphere.means, old.means)
    with pytest.raises(ValueError, match="space='sphere'"):
        DecoupledPrototypes(4, 16, space="whitened").load_state_dict(dict(state))
    # a whitened checkpoint round-trips with its statistics
    new = DecoupledPrototypes(4, 16)
    new.update(cone(64), step=0)
    new.commit()
    again = DecoupledPrototypes(4, 16)
    again.load_state_dict(new.state_dict())
    assert torch.equal(again.embedding_space.transform_matrix, new.embedding_space.transform_matrix)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="space must be one of"):
        EmbeddingSpace(4, "polar")
    with pytest.raises(ValueError, match="momentum"):
        EmbeddingSpace(4, "whitened", momentum=1.0)
    with pytest.raises(ValueError, match="shrinkage"):
        EmbeddingSpace(4, "whitened", shrinkage=0.0)
    assert SPACES == ("sphere", "centered", "standardized", "whitened")


def test_the_config_switch_reaches_the_mixture_and_the_recipes_keep_the_sphere():
    from pathlib import Path

    from nocollapse.config import build_config
    from nocollapse.methods.prototype_method import build_decoupled_prototypes

    configs = Path(__file__).resolve().parents[1] / "src" / "nocollapse" / "configs"
    cfg, _ = build_config(configs / "digits.yaml", [])
    assert cfg.method.prototypes == "decoupled"
    assert build_decoupled_prototypes(cfg, 16, lambda e: int(e)).embedding_space.space == "sphere"
    cfg, _ = build_config(configs / "digits.yaml", ["gmm.space=whitened", "gmm.space_momentum=0.9"])
    space = build_decoupled_prototypes(cfg, 16, lambda e: int(e)).embedding_space
    assert (space.space, space.momentum) == ("whitened", 0.9)


def _whitened_ranked(rank, world_size):
    protos = DecoupledPrototypes(6, 16, seed=0)
    gammas = []
    for step in range(3):
        x = cone(24, seed=10 + step)
        part = x.view(2, 12, 16)[:, rank * 12 // world_size:(rank + 1) * 12 // world_size].reshape(-1, 16)
        gammas.append(protos.update(part, step, views=2))
        protos.commit()
    return {"state": protos.state_dict(), "gammas": gammas}


@pytest.mark.distributed
def test_two_processes_hold_the_space_of_one_process_on_the_joined_batch():
    single = _whitened_ranked(0, 1)
    ranks = run_distributed(_whitened_ranked, 2)
    # The statistics agree to float32 rounding. The whitening then multiplies the directions of
    # least variance by up to 1 / sqrt(shrinkage), and the means fitted there inherit the
    # rounding of the all-reduced sums amplified by as much.
    for r, result in enumerate(ranks):
        for name, buf in single["state"].items():
            tolerance = 1e-5 if name.startswith("embedding_space.") and name != "embedding_space.transform_matrix" else 1e-3
            assert torch.allclose(result["state"][name].float(), buf.float(), atol=tolerance), (r, name)
    for step in range(3):
        # each process holds [view 1 of its half; view 2 of its half]
        single_views = single["gammas"][step].view(2, 12, -1)
        joined = torch.cat([ranks[0]["gammas"][step].view(2, 6, -1), ranks[1]["gammas"][step].view(2, 6, -1)], 1)
        assert torch.allclose(joined, single_views, atol=1e-3)
