"""CPLearn: the loss against hand-derived values and the released formula, the temperature, the
fixed codebook, gradients, the 2-process marginal, and a digits run from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.losses.cplearn import cplearn_loss, cplearn_temperature, prior_matching
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.prototypes.fixed import rademacher_codebook

C = 64
N = 8


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.log()).sum())


# ---- the loss -----------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_every_fully_collapsed_state_scores_ln_c_plus_beta_minus_one_entropy(beta):
    gen = torch.Generator().manual_seed(0)
    for scale in (0.0, 1.0, 5.0, 30.0):          # uniform, soft, sharp, nearly one-hot
        row = scale * torch.randn(C, generator=gen)
        logits = row.expand(N, C).clone()
        p = torch.softmax(row.double(), 0)
        expected = math.log(C) + (beta - 1.0) * _entropy(p)
        assert float(cplearn_loss(logits, logits.clone(), beta=beta)) == pytest.approx(expected, abs=1e-4)


def test_every_sample_saturated_on_its_own_code_with_identical_views_scores_ln_c_over_n():
    logits = torch.full((N, C), -1e4)
    logits[torch.arange(N), torch.arange(N) * 3] = 0.0
    assert float(cplearn_loss(logits, logits.clone())) == pytest.approx(math.log(C / N), abs=1e-5)


def test_both_priors_are_minimised_at_the_uniform_marginal():
    uniform = torch.full((C,), 1.0 / C)
    assert float(prior_matching(uniform, "reverse_kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(prior_matching(uniform, "cross_entropy")) == pytest.approx(math.log(C), abs=1e-5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = torch.softmax(0.5 * torch.randn(C, generator=gen), 0)
        assert float(prior_matching(other, "reverse_kl")) > 1e-4
        assert float(prior_matching(other, "cross_entropy")) > math.log(C) + 1e-4


def _released_formula(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """The released computation step by step: row-max shift, softmax / log-softmax via logsumexp,
    per-view marginal, sum_j P log(c m) averaged over rows, and the two cross-view terms."""
    a, b = a.double(), b.double()
    a = a - a.max(1, keepdim=True).values
    b = b - b.max(1, keepdim=True).values
    log_pa = a - torch.logsumexp(a, 1, keepdim=True)
    log_pb = b - torch.logsumexp(b, 1, keepdim=True)
    pa, pb = log_pa.exp(), log_pb.exp()
    c = a.shape[1]
    ma, mb = pa.mean(0), pb.mean(0)
    prior_b = (pb * torch.log(c * mb)).sum(1).mean()
    prior_a = (pa * torch.log(c * ma)).sum(1).mean()
    inv_ab = -(pb * log_pa).sum(1).mean()
    inv_ba = -(pa * log_pb).sum(1).mean()
    return 0.5 * (prior_b + beta * inv_ab) + 0.5 * (prior_a + beta * inv_ba)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_loss_equals_the_released_formula(beta):
    gen = torch.Generator().manual_seed(2)
    a, b = 3 * torch.randn(N, C, generator=gen), 3 * torch.randn(N, C, generator=gen)
    assert float(cplearn_loss(a, b, beta=beta)) == pytest.approx(float(_released_formula(a, b, beta)), abs=1e-5)


def test_cross_entropy_prior_is_the_papers_form():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(N, C, generator=gen), torch.randn(N, C, generator=gen)
    pa, pb = torch.softmax(a.double(), 1), torch.softmax(b.double(), 1)
    prior = lambda p: -(torch.log(p.mean(0))).sum() / C  # noqa: E731
    inv = -(pb * torch.log(pa)).sum(1).mean() - (pa * torch.log(pb)).sum(1).mean()
    expected = 0.5 * (prior(pa) + prior(pb)) + 0.5 * inv
    assert float(cplearn_loss(a, b, prior="cross_entropy")) == pytest.approx(float(expected), abs=1e-5)


def test_loss_runs_in_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(4)
    a, b = 20 * torch.randn(N, C, generator=gen), 20 * torch.randn(N, C, generator=gen)
    reference = cplearn_loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = cplearn_loss(a.bfloat16(), b.bfloat16())
    assert under.dtype == torch.float32
    assert float(under) == pytest.approx(float(cplearn_loss(a.bfloat16().float(), b.bfloat16().float())), abs=1e-5)
    assert float(reference) == pytest.approx(float(under), rel=0.02)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="prior"):
        cplearn_loss(torch.zeros(2, 4), torch.zeros(2, 4), prior="forward")
    with pytest.raises(ValueError, match=r"\[n, c\]"):
        cplearn_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="eps"):
        cplearn_temperature(16, 10**9, 8, eps=1e-8)


def test_temperature_matches_the_formula():
    f, c, n = 2048, 16384, 64
    log_term = math.log((1 - 1e-8 * (c - 1)) / 1e-8)
    assert cplearn_temperature(f, c, n) == pytest.approx(f / (8 * log_term))
    assert 1 / cplearn_temperature(f, c, n) == pytest.approx(0.07196, abs=1e-4)
    # an embedding on a code, h = w / sqrt(n), gets the design assignment 1 - eps (c - 1)
    w = rademacher_codebook(f, 32, seed=0)
    h = w[:, 5] / math.sqrt(n)
    p = torch.softmax((h.double() @ w.double()) / cplearn_temperature(f, 32, n), 0)
    assert float(p[5]) > 0.999 and float(p[5]) == pytest.approx(1 - 1e-8 * 31, abs=1e-3)


# ---- the method ---------------------------------------------------------------------------

TINY = ["method.name=cplearn", "data.image_size=8", "model.width_multiplier=0.125", "cplearn.embedding_dim=16",
        "cplearn.num_codes=64", "train.batch_size=6", "train.epochs=1"]


def _method(*overrides):
    cfg, _ = build_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=4)


def _crops(batch=6):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(2)]


def test_codebook_is_fixed_seeded_saved_and_restored(tmp_path):
    cfg, method = _method()
    book = method.codebook
    assert book.shape == (16, 64) and set(book.unique().tolist()) == {-1.0, 1.0}
    assert not any(p is book for p in method.parameters()) and not book.requires_grad
    assert torch.equal(book, rademacher_codebook(16, 64, seed=0))
    assert not torch.equal(book, rademacher_codebook(16, 64, seed=1))
    assert "codebook" in method.state_dict()
    assert method.num_prototypes == 64 and method.prototype_vectors().shape == (64, 16)
    # a training step leaves it alone
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(_crops(), 0).loss.backward()
    optimizer.step()
    assert torch.equal(method.codebook, book)
    # a checkpoint restores it even into a model built with another seed
    path = tmp_path / "m.pt"
    torch.save(method.state_dict(), path)
    _, other = _method("cplearn.codebook_seed=7")
    assert not torch.equal(other.codebook, book)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(other.codebook, book)


def test_default_number_of_codes_is_eight_times_f():
    cfg, method = _method("cplearn.num_codes=null")
    assert method.num_prototypes == 8 * 16


def test_gradients_reach_the_projector_through_both_views():
    _, method = _method()
    a, b = _crops()
    _, h_a = method.encoder([a])
    _, h_b = method.encoder([b])
    h_a.retain_grad()
    h_b.retain_grad()
    loss = cplearn_loss(method.code_logits(h_a), method.code_logits(h_b))
    loss.backward()
    assert h_a.grad.abs().sum() > 0 and h_b.grad.abs().sum() > 0
    assert method.encoder.projector.linear.weight.grad.abs().sum() > 0


def test_training_uses_the_training_temperature_at_any_evaluation_batch():
    _, method = _method()
    method.eval()
    h = torch.tanh(torch.randn(10, 16))
    tau = cplearn_temperature(16, 64, 6)
    assert torch.allclose(method.scores(h), h @ method.codebook / tau, atol=1e-5)
    assert torch.allclose(method.scores(h[:3]), method.scores(h)[:3], atol=1e-6)


def test_code_logits_are_fp32_under_bf16_autocast():
    _, method = _method()
    h = torch.tanh(torch.randn(4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = method.code_logits(h.bfloat16())
    assert z.dtype == torch.float32


def test_l2_embedding_has_the_norm_of_a_code_over_sqrt_n():
    _, method = _method("cplearn.embedding=l2")
    _, h = method.encoder([_crops()[0]])
    assert torch.allclose(h.norm(dim=1), torch.full((6,), math.sqrt(16 / 6)), atol=1e-5)


def test_uniform_loss_is_the_collapsed_loss():
    _, method = _method()
    assert method.uniform_loss() == pytest.approx(math.log(64))
    _, method = _method("cplearn.prior=cross_entropy", "cplearn.beta=0.5")
    logits = torch.zeros(6, 64)
    assert method.uniform_loss() == pytest.approx(float(cplearn_loss(logits, logits, 0.5, "cross_entropy")))


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="local_crops"):
        build_config(overrides=[*TINY, "views.local_crops=2"])
    with pytest.raises(ConfigError, match="cplearn"):
        build_config(overrides=["method.name=dino", "cplearn.beta=0.5"])


def test_adam_with_decay_on_every_parameter():
    from nocollapse.utils.optim import build_optimizer

    cfg, method = _method("optim.name=adam", "optim.decay_norms_and_biases=true")
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["apply_weight_decay"]
    cfg, method = _method("optim.name=adam")
    groups = build_optimizer(cfg.optim, method.parameter_groups()).param_groups
    assert [g["apply_weight_decay"] for g in groups] == [True, False]


# ---- two processes ------------------------------------------------------------------------

def _distributed_loss(rank: int, world_size: int, logits_a, logits_b, all_reduce: bool) -> dict:
    n = logits_a.shape[0] // world_size
    a = logits_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = logits_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = cplearn_loss(a, b, beta=0.7, all_reduce_marginal=all_reduce)
    loss.backward()
    cfg, _ = build_config(overrides=[*TINY, "train.batch_size=3", f"cplearn.all_reduce_marginal={all_reduce}"])
    torch.manual_seed(rank)  # the codebook must not depend on the global RNG
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=4)
    return {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "codebook": method.codebook,
            "temperature": method.temperature}


def test_two_processes_marginal_all_reduce_equals_the_joined_batch():
    gen = torch.Generator().manual_seed(5)
    a, b = 2 * torch.randn(8, C, generator=gen), 2 * torch.randn(8, C, generator=gen)
    on = run_distributed(_distributed_loss, 2, args=(a, b, True))
    off = run_distributed(_distributed_loss, 2, args=(a, b, False))
    ja, jb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    joined = cplearn_loss(ja, jb, beta=0.7)
    joined.backward()
    # on: the mean of the per-process losses is the joined loss, and the per-process gradients,
    # averaged by DDP (sum / 2), are the joined gradients
    assert float((on[0]["loss"] + on[1]["loss"]) / 2) == pytest.approx(float(joined.detach()), abs=1e-5)
    assert torch.allclose(torch.cat([on[0]["grad_a"], on[1]["grad_a"]]) / 2, ja.grad, atol=1e-6)
    assert torch.allclose(torch.cat([on[0]["grad_b"], on[1]["grad_b"]]) / 2, jb.grad, atol=1e-6)
    # off: each process's loss is the single-process loss on its own shard
    for r in range(2):
        shard = cplearn_loss(a[4 * r:4 * r + 4], b[4 * r:4 * r + 4], beta=0.7)
        assert float(off[r]["loss"]) == pytest.approx(float(shard), abs=1e-6)
    # the codebook is equal on both ranks; the temperature uses the global batch only when on
    assert torch.equal(on[0]["codebook"], on[1]["codebook"])
    assert on[0]["temperature"] == pytest.approx(cplearn_temperature(16, 64, 6))
    assert off[0]["temperature"] == pytest.approx(cplearn_temperature(16, 64, 3))


# ---- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cplearn_trains_end_to_end_on_digits_from_the_cli(tmp_path):
    from nocollapse.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", "digits_cplearn", "--out", str(out), "--set", "data.image_size=8",
            "model.width_multiplier=0.125", "cplearn.embedding_dim=32", "cplearn.num_codes=256",
            "train.epochs=2", "train.batch_size=64", "train.progress=false", "train.threads=1"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cplearn" and summary["num_prototypes"] == 256
    assert 0.3 < summary["knn_top1"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
