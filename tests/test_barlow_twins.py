"""Barlow Twins: the loss against hand-derived values and lightly's BarlowTwinsLoss, fp32 under
bf16 autocast, 2-process parity of the loss and of training steps, the method's hooks and
settings, the signature of the failure switch (lambda_offdiag = 0) and a digits run from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightly.loss import BarlowTwinsLoss

from digits_training import train_on_digits
from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.losses.barlow_twins import barlow_twins_loss, barlow_twins_terms, cross_correlation
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone

LAMBDA = 0.0051


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official code's affine-free BatchNorm, written out in float64."""
    z = z.double()
    return (z - z.mean(0)) / torch.sqrt(z.var(0, correction=0) + eps)


# ---- the loss -----------------------------------------------------------------------------

def test_small_example_by_hand():
    # columns standardise (eps = 0) to +-1: zhat_a = [[1, 1], [-1, -1]], zhat_b = [[1, -1], [-1, 1]],
    # so C = [[1, -1], [1, -1]]: invariance (1 - 1)^2 + (1 + 1)^2 = 4, redundancy 1 + 1 = 2
    z_a = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    z_b = torch.tensor([[3.0, -1.0], [-3.0, 1.0]])
    assert torch.allclose(cross_correlation(z_a, z_b, eps=0.0), torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    invariance, redundancy = barlow_twins_terms(z_a, z_b, eps=0.0)
    assert float(invariance) == pytest.approx(4.0) and float(redundancy) == pytest.approx(2.0)
    assert float(barlow_twins_loss(z_a, z_b, 0.5, eps=0.0)) == pytest.approx(5.0)
    assert float(barlow_twins_loss(z_a, z_b, 0.5, scale=0.1, eps=0.0)) == pytest.approx(0.5)
    # with the default eps the column of variance 1 gives 1 / sqrt(1 + 1e-5) instead of 1
    assert float(barlow_twins_loss(z_a, z_b, 0.5)) == pytest.approx(5.0, abs=1e-4)


def test_identical_views_have_a_unit_diagonal_and_cost_only_the_redundancy_term():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(256, 32, generator=gen) * torch.linspace(0.5, 3.0, 32) + 2.0
    c = cross_correlation(z, z.clone())
    # C_kk = var_k / (var_k + eps): 1 up to eps (the smallest column variance here is 0.25)
    var = z.double().var(0, correction=0)
    assert torch.allclose(torch.diagonal(c).double(), var / (var + 1e-5), atol=1e-6)
    assert float(torch.diagonal(c).min()) >= 0.9999
    zhat = _standardise(z)
    reference = zhat.t() @ zhat / 256
    assert torch.allclose(c.double(), reference, atol=1e-5)
    off = reference - torch.diag(torch.diagonal(reference))
    expected = LAMBDA * float(off.pow(2).sum())
    assert float(barlow_twins_loss(z, z.clone(), LAMBDA)) == pytest.approx(expected, rel=1e-3)
    # the invariance term left by eps: sum_k (eps / (var_k + eps))^2, negligible here
    assert float(barlow_twins_terms(z, z.clone())[0]) == pytest.approx(float((1e-5 / (var + 1e-5)).pow(2).sum()),
                                                                   abs=1e-9)


def test_a_constant_output_costs_d_whatever_the_constant():
    for value in (0.0, 3.0, -7.5):
        c = torch.full((16, 24), value)
        assert float(barlow_twins_loss(c, c.clone())) == pytest.approx(24.0)
        assert float(barlow_twins_loss(c, c.clone(), scale=0.1)) == pytest.approx(2.4)
    # constant per column but different between columns: still standardised to 0
    row = torch.randn(24)
    c = row.expand(16, 24).clone()
    assert float(barlow_twins_loss(c, torch.randn(16, 24))) == pytest.approx(24.0)


def _lightly_and_ours(z_a, z_b, lambda_offdiag, lightly_lambda):
    grads = []
    values = []
    for fn in (lambda a, b: barlow_twins_loss(a, b, lambda_offdiag),
               lambda a, b: BarlowTwinsLoss(lambda_param=lightly_lambda)(a, b)):
        a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
        loss = fn(a, b)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append((a.grad, b.grad))
    return values, grads


@pytest.mark.parametrize("lambda_offdiag", [5e-3, LAMBDA, 0.1])
def test_equals_lightly_in_value_and_gradient_with_the_same_lambda(lambda_offdiag):
    gen = torch.Generator().manual_seed(1)
    z_a = 2 * torch.randn(32, 16, generator=gen) + 1
    z_b = z_a + 0.5 * torch.randn(32, 16, generator=gen)
    (ours, theirs), ((ga, gb), (la, lb)) = _lightly_and_ours(z_a, z_b, lambda_offdiag, lambda_offdiag)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert torch.allclose(ga, la, atol=1e-6) and torch.allclose(gb, lb, atol=1e-6)


def test_lightly_default_lambda_is_the_papers_not_the_codes():
    """lightly defaults to the paper's 5e-3, this library to the official code's 0.0051: the two
    defaults differ by exactly 0.0001 x the redundancy term."""
    assert BarlowTwinsLoss().lambda_param == 5e-3
    gen = torch.Generator().manual_seed(2)
    z_a, z_b = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    _, redundancy = barlow_twins_terms(z_a, z_b)
    difference = float(barlow_twins_loss(z_a, z_b)) - float(BarlowTwinsLoss()(z_a, z_b))
    assert difference == pytest.approx(1e-4 * float(redundancy), rel=1e-3)
    assert abs(difference) > 1e-4


def test_loss_is_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = 4 * torch.randn(64, 32, generator=gen), 4 * torch.randn(64, 32, generator=gen)
    reference = barlow_twins_loss(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = barlow_twins_loss(z_a.bfloat16(), z_b.bfloat16())
        c = cross_correlation(z_a.bfloat16(), z_b.bfloat16())
    assert under.dtype == torch.float32 and c.dtype == torch.float32
    rounded = barlow_twins_loss(z_a.bfloat16().float(), z_b.bfloat16().float())
    assert float(under) == pytest.approx(float(rounded), rel=1e-5)
    assert float(under) == pytest.approx(float(reference), rel=0.02)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="lambda_offdiag"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), lambda_offdiag=-1.0)
    with pytest.raises(ValueError, match="scale"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), scale=0.0)


# ---- the method ---------------------------------------------------------------------------

TINY = ["method.name=barlow_twins", "data.image_size=8", "model.width_multiplier=0.125",
        "barlow_twins.hidden_dim=32", "barlow_twins.output_dim=16", "train.epochs=1"]


def _method(*overrides):
    cfg, _ = build_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=4)


def _crops(batch=6):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(2)]


def test_step_output_hooks_and_projector_layout():
    cfg, method = _method()
    out = method(_crops(), 0)
    assert set(out.logs) == {"loss_invariance", "loss_redundancy"}
    expected = cfg.barlow_twins.scale_loss * (out.logs["loss_invariance"]
                                              + LAMBDA * out.logs["loss_redundancy"])
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.embeddings.shape == (6, 16) and out.embeddings.dtype == torch.float32
    assert not out.embeddings.requires_grad and out.teacher_probs is None
    assert out.features.shape == (6, method.feature_dim) and not out.features.requires_grad
    assert method.eval_backbone() is method.encoder.backbone and method.eval_encoder() is method.encoder
    assert method.num_prototypes is None and method.prototype_vectors() is None
    linears = [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.out_features for m in linears] == [32, 32, 16] and len(norms) == 2
    assert all(m.bias is None for m in linears)          # the official projector has no biases
    # without BatchNorm the hidden layers keep a bias; the last never has one
    _, plain = _method("barlow_twins.batchnorm=false")
    linears = [m for m in plain.encoder.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.bias is not None for m in linears] == [True, True, False]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.encoder.projector.modules())
    fields = method.summary_fields()
    assert fields["lambda_offdiag"] == LAMBDA and fields["scale_loss"] == 1.0
    assert fields["projector_output_dim"] == 16 and fields["projector_batchnorm"] is True


def test_uniform_loss_is_the_loss_of_a_collapsed_network():
    for scale in ("1.0", "0.1"):
        _, method = _method(f"barlow_twins.scale_loss={scale}")
        assert method.uniform_loss() == pytest.approx(16 * float(scale))
        with torch.no_grad():   # a zero last layer (no bias) maps every image to 0
            [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.Linear)][-1].weight.zero_()
        assert float(method(_crops(), 0).loss.detach()) == pytest.approx(method.uniform_loss(), rel=1e-6)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="barlow_twins.lambda_offdiag.*too small"):
        build_config(overrides=[*TINY, "barlow_twins.lambda_offdiag=-0.1"])
    with pytest.raises(ConfigError, match="scale_loss"):
        build_config(overrides=[*TINY, "barlow_twins.scale_loss=0"])
    with pytest.raises(ConfigError, match="local_crops"):
        build_config(overrides=[*TINY, "views.local_crops=2"])
    with pytest.raises(ConfigError, match="barlow_twins"):
        build_config(overrides=["method.name=simclr", "barlow_twins.lambda_offdiag=0.01"])
    cfg, _ = build_config(overrides=[*TINY, "barlow_twins.lambda_offdiag=0"])   # the failure switch is allowed
    assert cfg.barlow_twins.lambda_offdiag == 0


def test_recipe_resolves_by_name():
    from nocollapse.cli import _resolve_config_path

    cfg, _ = build_config(_resolve_config_path("digits/barlow_twins"))
    assert cfg.method.name == "barlow_twins" and cfg.data.dataset == "digits"
    assert cfg.views.local_crops == 0 and cfg.barlow_twins.output_dim == 512


# ---- two processes ------------------------------------------------------------------------

def _distributed_loss(rank: int, world_size: int, z_a, z_b) -> dict:
    n = z_a.shape[0] // world_size
    out = {}
    for name in ("ours", "lightly"):
        a = z_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        if name == "ours":
            loss = barlow_twins_loss(a, b, LAMBDA)
        else:
            loss = BarlowTwinsLoss(LAMBDA, gather_distributed=True)(a, b)
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad}
    return out


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_joined_batch():
    gen = torch.Generator().manual_seed(4)
    z_a = torch.randn(12, 6, generator=gen)
    z_a[6:] = 3 * z_a[6:] + 2          # the two halves have different statistics
    z_b = z_a + 0.3 * torch.randn(12, 6, generator=gen)
    ranks = run_distributed(_distributed_loss, 2, args=(z_a, z_b))
    a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    joined = barlow_twins_loss(a, b, LAMBDA)
    joined.backward()
    ours = [r["ours"] for r in ranks]
    # every process holds the global loss; DDP averages the gradients: (g_0 + g_1) / 2
    for r in range(2):
        assert float(ours[r]["loss"]) == pytest.approx(float(joined.detach()), rel=1e-5)
    for key, full in (("grad_a", a.grad), ("grad_b", b.grad)):
        assert torch.allclose(torch.cat([ours[0][key], ours[1][key]]) / 2, full, atol=1e-6), key
    # lightly standardises each half with its own statistics and averages the two C: another
    # estimator, which differs from the joined batch when the halves differ
    theirs = float(ranks[0]["lightly"]["loss"])
    assert abs(theirs - float(joined.detach())) > 0.05 * float(joined.detach())


GLOBAL_BATCH = 8
BASE = ["method.name=barlow_twins", "model.backbone=vit_tiny", "model.patch_size=4", "barlow_twins.hidden_dim=32",
        "barlow_twins.output_dim=16", "barlow_twins.batchnorm=false", "train.epochs=1", "optim.name=sgd"]


def _train_steps(rank: int, world_size: int, steps: int = 3) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from nocollapse.engine.trainer import _no_buffer_sync, optimisation_step
    from nocollapse.utils import distributed as dist_utils
    from nocollapse.utils.optim import build_optimizer

    cfg, _ = build_config(overrides=BASE)
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=10)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    model = DistributedDataParallel(method, **_no_buffer_sync()) if world_size > 1 else method
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen) for _ in range(2)]
    per_rank = GLOBAL_BATCH // world_size
    crops = [c[rank * per_rank:(rank + 1) * per_rank] for c in crops]
    losses = []
    for step in range(steps):
        loss, _ = optimisation_step(model, method, optimizer, crops, step, 0.05, 1e-4, clip_grad=3.0)
        losses.append(dist_utils.all_reduce_mean(loss.clone()))
    return {"losses": torch.stack(losses), "state": method.state_dict(), "initial": initial}


@pytest.mark.distributed
def test_training_steps_in_two_processes_equal_one_process():
    single = _train_steps(0, 1)
    ranks = run_distributed(_train_steps, 2)
    for r, result in enumerate(ranks):
        assert torch.allclose(result["losses"], single["losses"], atol=1e-5), r
        for name, value in single["state"].items():
            assert torch.allclose(result["state"][name].float(), value.float(), atol=2e-5), (r, name)
    moved = [k for k, v in single["state"].items() if not torch.equal(v, single["initial"][k])]
    assert any(k.startswith("encoder.projector.") for k in moved)
    assert any(k.startswith("encoder.backbone.") for k in moved)


# ---- the failure switch -------------------------------------------------------------------

SIGNATURE = ["method.name=barlow_twins", "data.image_size=8", "model.width_multiplier=0.125",
             "barlow_twins.hidden_dim=64", "barlow_twins.output_dim=32", "train.batch_size=64",
             "views.global_scale=[0.4,1.0]", "views.hflip=0.0", "views.hue=0.0", "views.saturation=0.0",
             "views.grayscale=0.0", "views.solarize=[0.0,0.0]", "optim.name=lars"]


def test_without_the_redundancy_term_the_embeddings_lose_rank():
    """lambda_offdiag = 0 leaves only the invariance term: the standardised projections keep unit
    std, but their dimensions become correlated, so the (centred) effective rank of the
    embeddings ends far below the healthy run's and the unweighted redundancy term climbs. The
    loss ignores the mean of z, hence the centred rank. The healthy run uses a lambda suited to a
    32-wide projector (the default 0.0051 is sized for thousands of dimensions)."""
    from nocollapse.diagnostics.embeddings import effective_rank

    healthy, healthy_logs = train_on_digits([*SIGNATURE, "barlow_twins.lambda_offdiag=0.1"])
    switched, switched_logs = train_on_digits([*SIGNATURE, "barlow_twins.lambda_offdiag=0"])
    rank_healthy, rank_switched = effective_rank(healthy, center=True), effective_rank(switched, center=True)
    assert rank_healthy > 4.0
    assert rank_switched < 3.0 and rank_switched < rank_healthy / 2
    assert switched_logs["loss_redundancy"] > 3 * healthy_logs["loss_redundancy"]
    # not a point collapse: the switched embeddings still vary over the batch
    assert float(switched.std(0).mean()) > 0.1


# ---- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_end_to_end_on_digits_and_evaluates_from_the_cli(tmp_path, capsys):
    from nocollapse.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", "digits/barlow_twins", "--out", str(out), "--set", "data.image_size=8",
            "model.width_multiplier=0.125", "barlow_twins.hidden_dim=64", "barlow_twins.output_dim=32",
            "train.epochs=2", "train.batch_size=64", "train.progress=false", "train.threads=1",
            "eval.batch_size=256", "diagnostics.plots=false"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "barlow_twins" and summary["lambda_offdiag"] == LAMBDA
    assert 0.3 < summary["knn_top1"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(math.isfinite(r["loss"]) and "loss_redundancy" in r for r in steps)
    capsys.readouterr()
    assert main(["eval", str(out), "--knn", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["knn"]["knn_k20_t0.07"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)
    assert main(["diagnose", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedding_rankme"] > 1.0 and report["bottleneck_embedding_std"] > 0
    assert "unique_prototypes" not in report and "prototype_utilization" not in report
