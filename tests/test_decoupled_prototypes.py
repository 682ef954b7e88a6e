"""nocollapse.DecoupledPrototypes: the mixture as a module for any loop (and for our methods)."""

import pytest
import torch
import torch.nn.functional as F

from nocollapse import DecoupledPrototypes


def _batch(n=16, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_forward_scores_against_the_means_and_gives_them_no_gradient():
    protos = DecoupledPrototypes(8, 8, space="sphere")    # the scores are plain z @ mu^T there
    protos.update(_batch(), step=0)
    protos.commit()
    z = _batch(4, seed=1).requires_grad_()
    scores = protos(z)
    assert torch.allclose(scores, z.detach() @ protos.means.t())
    scores.sum().backward()
    assert z.grad is not None and list(protos.parameters()) == []
    assert torch.allclose(protos.normalized_scores(3 * z.detach()), scores.detach(), atol=1e-6)


def test_nothing_is_written_before_commit_and_discard_drops_the_update():
    protos = DecoupledPrototypes(8, 8)
    protos.update(_batch(), step=0)
    protos.commit()
    before = {k: v.clone() for k, v in protos.state_dict().items()}
    protos.update(_batch(seed=2), step=1)
    assert protos.pending
    assert all(torch.equal(v, before[k]) for k, v in protos.state_dict().items())
    assert torch.equal(protos.step_means, before["means"])
    protos.discard()
    assert not protos.pending and all(torch.equal(v, before[k]) for k, v in protos.state_dict().items())
    protos.update(_batch(seed=2), step=1)
    protos.commit()
    assert int(protos.num_updates) == int(before["num_updates"]) + 1
    assert not torch.equal(protos.means, before["means"])


def test_the_e_step_temperature_ramps_linearly_by_step():
    protos = DecoupledPrototypes(4, 8, beta0=0.2, anneal_steps=4)
    assert [protos.beta_at(t) for t in (0, 1, 2, 4, 10)] == pytest.approx([0.2, 0.4, 0.6, 1.0, 1.0])
    assert DecoupledPrototypes(4, 8).beta_at(0) == 1.0


def test_update_returns_view_major_responsibilities_of_a_sample_major_em_step():
    """Two views as [view 1 block; view 2 block] give the responsibilities in the same order, and
    the EM step equals the mixture's own on the interleaved (sample-major) rows."""
    views = _batch(32, seed=3)
    protos = DecoupledPrototypes(16, 8, beta0=0.5, anneal_steps=10, space="sphere")
    twin = DecoupledPrototypes(16, 8)
    protos.update(_batch(16, seed=4), step=0)
    protos.commit()
    twin.em_step(_batch(16, seed=4), beta=0.5)
    gamma = protos.update(views, step=5, views=2)
    protos.commit()
    interleaved = views.view(2, 16, 8).transpose(0, 1).reshape(32, 8)
    gamma_twin = twin.em_step(interleaved, beta=0.75)
    assert torch.allclose(gamma, gamma_twin.view(16, 2, -1).transpose(0, 1).reshape(32, -1))
    assert torch.allclose(protos.means, twin.means)


def test_buffer_seeding_and_refresh_follow_the_committed_steps():
    protos = DecoupledPrototypes(8, 8, buffer_size=32, seed_after_steps=3, refresh_every_steps=2)
    seedings = []
    for step in range(8):
        protos.update(_batch(16, seed=step), step=step)
        protos.commit()
        seedings.append(int(protos.num_buffer_seedings))
    # seeded after step 2 (3 steps done), refreshed after steps 4 and 6
    assert seedings == [0, 0, 1, 1, 2, 2, 3, 3]


def test_state_dict_restores_the_mixture_and_its_buffer():
    protos = DecoupledPrototypes(8, 8, buffer_size=16, seed_after_steps=2)
    for step in range(3):
        protos.update(_batch(seed=step), step=step)
        protos.commit()
    twin = DecoupledPrototypes(8, 8, buffer_size=16, seed_after_steps=2)
    twin.load_state_dict(protos.state_dict())
    x = _batch(seed=9)
    assert torch.equal(protos.update(x, step=3), twin.update(x, step=3))


def test_bad_input_gets_a_clear_error():
    protos = DecoupledPrototypes(4, 8)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        protos.update(torch.randn(4, 5), step=0)
    with pytest.raises(ValueError, match="do not split into 3 views"):
        protos.update(torch.randn(4, 8), step=0, views=3)
    with pytest.raises(ValueError, match="need a buffer"):
        DecoupledPrototypes(4, 8, seed_after_steps=10)
    with pytest.raises(ValueError, match="beta0"):
        DecoupledPrototypes(4, 8, beta0=0.0)
