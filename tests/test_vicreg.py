"""VICReg: the loss against hand-derived values and lightly's VICRegLoss, fp32 under bf16
autocast, 2-process parity of the loss and of training steps, the method's hooks and settings,
the signature of the failure switch (variance_weight = 0) and a digits run from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightly.loss import VICRegLoss

from digits_training import train_on_digits
from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.losses.vicreg import collapsed_vicreg_loss, covariance_term, variance_term, vicreg_loss, vicreg_terms
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone


# ---- the loss -----------------------------------------------------------------------------

def test_a_constant_output_costs_the_variance_hinge_alone():
    for value in (0.0, 2.5):
        c = torch.full((8, 16), value)
        assert float(vicreg_loss(c, c.clone())) == pytest.approx(24.75)
        assert float(vicreg_loss(c, c.clone(), variance_weight=0.0)) == 0.0
    assert collapsed_vicreg_loss() == pytest.approx(24.75)
    assert collapsed_vicreg_loss(10.0) == pytest.approx(9.9)
    invariance, variance, covariance = vicreg_terms(torch.zeros(8, 16), torch.zeros(8, 16))
    assert (float(invariance), float(covariance)) == (0.0, 0.0) and float(variance) == pytest.approx(0.99)


def test_small_example_by_hand():
    # n = 2, d = 2. Every column of either view has values +-0.5 around its mean: unbiased variance
    # 0.5, so each hinge is 1 - sqrt(0.5 + 1e-4). The two columns of z_a move together
    # (covariance +0.5), those of z_b oppositely (-0.5): c = 2 * 0.5^2 / 2 = 0.25 per view. The views
    # differ by 1 in two of the four entries: s = 0.5.
    z_a = torch.tensor([[0.5, 1.0], [-0.5, 0.0]])
    z_b = torch.tensor([[0.5, 0.0], [-0.5, 1.0]])
    hinge = 1 - math.sqrt(0.5 + 1e-4)
    assert float(variance_term(z_a)) == pytest.approx(hinge)
    assert float(covariance_term(z_a)) == pytest.approx(0.25) and float(covariance_term(z_b)) == pytest.approx(0.25)
    invariance, variance, covariance = vicreg_terms(z_a, z_b)
    assert float(invariance) == pytest.approx(0.5)
    assert float(variance) == pytest.approx(hinge)           # halved per branch: (h + h) / 2
    assert float(covariance) == pytest.approx(0.5)           # not halved: 0.25 + 0.25
    assert float(vicreg_loss(z_a, z_b)) == pytest.approx(25 * 0.5 + 25 * hinge + 0.5, rel=1e-6)
    assert float(vicreg_loss(z_a, z_b, 1.0, 2.0, 3.0)) == pytest.approx(0.5 + 2 * hinge + 1.5, rel=1e-6)
    # columns spread beyond gamma cost no variance: 2 z_a has std sqrt(2 + 1e-4) > 1
    assert float(variance_term(2 * z_a)) == 0.0


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 10.0, 3.0), (5.0, 0.0, 1.0)])
def test_equals_lightly_in_value_and_gradient(weights):
    gen = torch.Generator().manual_seed(1)
    z_a = 0.7 * torch.randn(32, 16, generator=gen) + 1
    z_b = z_a + 0.3 * torch.randn(32, 16, generator=gen)
    results = []
    for fn in (lambda a, b: vicreg_loss(a, b, *weights),
               lambda a, b: VICRegLoss(lambda_param=weights[0], mu_param=weights[1], nu_param=weights[2])(a, b)):
        a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
        loss = fn(a, b)
        loss.backward()
        results.append((float(loss.detach()), a.grad, b.grad))
    (ours, ga, gb), (theirs, la, lb) = results
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert torch.allclose(ga, la, atol=1e-6) and torch.allclose(gb, lb, atol=1e-6)
    # lightly's defaults are the official code's weights, as ours
    lightly = VICRegLoss()
    assert (lightly.lambda_param, lightly.mu_param, lightly.nu_param, lightly.eps) == (25.0, 25.0, 1.0, 1e-4)


def test_loss_is_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = 3 * torch.randn(64, 32, generator=gen), 3 * torch.randn(64, 32, generator=gen)
    reference = vicreg_loss(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = vicreg_loss(z_a.bfloat16(), z_b.bfloat16())
    assert under.dtype == torch.float32
    rounded = vicreg_loss(z_a.bfloat16().float(), z_b.bfloat16().float())
    assert float(under) == pytest.approx(float(rounded), rel=1e-5)
    assert float(under) == pytest.approx(float(reference), rel=0.02)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="variance_weight"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 3), variance_weight=-1.0)


# ---- the method ---------------------------------------------------------------------------

TINY = ["method.name=vicreg", "data.image_size=8", "model.width_multiplier=0.125", "vicreg.hidden_dim=32",
        "vicreg.output_dim=16", "train.epochs=1"]


def _method(*overrides):
    cfg, _ = build_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=4)


def _crops(batch=6):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(2)]


def test_step_output_hooks_and_expander_layout():
    _, method = _method("vicreg.invariance_weight=2", "vicreg.variance_weight=3", "vicreg.covariance_weight=0.5")
    out = method(_crops(), 0)
    assert set(out.logs) == {"loss_invariance", "loss_variance", "loss_covariance"}
    expected = 2 * out.logs["loss_invariance"] + 3 * out.logs["loss_variance"] + 0.5 * out.logs["loss_covariance"]
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.embeddings.shape == (6, 16) and out.embeddings.dtype == torch.float32
    assert not out.embeddings.requires_grad and out.teacher_probs is None
    assert out.features.shape == (6, method.feature_dim) and not out.features.requires_grad
    assert method.eval_backbone() is method.encoder.backbone and method.eval_encoder() is method.encoder
    assert method.num_prototypes is None and method.prototype_vectors() is None
    linears = [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.out_features for m in linears] == [32, 32, 16] and len(norms) == 2
    assert all(m.bias is None for m in linears)
    _, plain = _method("vicreg.batchnorm=false")
    linears = [m for m in plain.encoder.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.bias is not None for m in linears] == [True, True, False]
    fields = method.summary_fields()
    assert (fields["invariance_weight"], fields["variance_weight"], fields["covariance_weight"]) == (2, 3, 0.5)
    assert fields["projector_output_dim"] == 16


def test_uniform_loss_is_the_loss_of_a_collapsed_network():
    for weight in ("25", "10", "0"):
        _, method = _method(f"vicreg.variance_weight={weight}")
        assert method.uniform_loss() == pytest.approx(0.99 * float(weight))
        with torch.no_grad():   # a zero last layer (no bias) maps every image to 0
            [m for m in method.encoder.projector.modules() if isinstance(m, torch.nn.Linear)][-1].weight.zero_()
        assert float(method(_crops(), 0).loss.detach()) == pytest.approx(method.uniform_loss(), abs=1e-5)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="vicreg.variance_weight.*too small"):
        build_config(overrides=[*TINY, "vicreg.variance_weight=-1"])
    with pytest.raises(ConfigError, match="all 0"):
        build_config(overrides=[*TINY, "vicreg.invariance_weight=0", "vicreg.variance_weight=0",
                                "vicreg.covariance_weight=0"])
    with pytest.raises(ConfigError, match="local_crops"):
        build_config(overrides=[*TINY, "views.local_crops=2"])
    with pytest.raises(ConfigError, match="vicreg"):
        build_config(overrides=["method.name=barlow_twins", "vicreg.variance_weight=1"])
    cfg, _ = build_config(overrides=[*TINY, "vicreg.variance_weight=0"])   # the failure switch is allowed
    assert cfg.vicreg.variance_weight == 0


def test_recipe_resolves_by_name():
    from nocollapse.cli import _resolve_config_path

    cfg, _ = build_config(_resolve_config_path("digits/vicreg"))
    assert cfg.method.name == "vicreg" and cfg.data.dataset == "digits"
    assert cfg.views.local_crops == 0 and cfg.vicreg.output_dim == 512


# ---- two processes ------------------------------------------------------------------------

def _distributed_loss(rank: int, world_size: int, z_a, z_b) -> dict:
    n = z_a.shape[0] // world_size
    out = {}
    for name in ("ours", "lightly_gathered", "lightly_local"):
        a = z_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        if name == "ours":
            loss = vicreg_loss(a, b)
        else:
            loss = VICRegLoss(gather_distributed=name == "lightly_gathered")(a, b)
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad}
    return out


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_joined_batch():
    gen = torch.Generator().manual_seed(4)
    z_a = 0.5 * torch.randn(12, 6, generator=gen)
    z_a[6:] = 3 * z_a[6:] + 2          # the two halves have different statistics
    z_b = z_a + 0.3 * torch.randn(12, 6, generator=gen)
    ranks = run_distributed(_distributed_loss, 2, args=(z_a, z_b))
    a, b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    joined = vicreg_loss(a, b)
    joined.backward()
    joined = float(joined.detach())
    ours = [r["ours"] for r in ranks]
    # the invariance term is each process's own: the mean of the per-process losses is the
    # joined loss, and the DDP-averaged gradients, (g_0 + g_1) / 2, are the joined gradients
    assert float((ours[0]["loss"] + ours[1]["loss"]) / 2) == pytest.approx(joined, rel=1e-5)
    assert float(ours[0]["loss"]) != pytest.approx(float(ours[1]["loss"]), rel=1e-3)
    for key, full in (("grad_a", a.grad), ("grad_b", b.grad)):
        assert torch.allclose(torch.cat([ours[0][key], ours[1][key]]) / 2, full, atol=1e-6), key
    for r in range(2):
        # lightly with gather_distributed=True is the same computation ...
        gathered = ranks[r]["lightly_gathered"]
        assert float(gathered["loss"]) == pytest.approx(float(ours[r]["loss"]), rel=1e-5)
        assert torch.allclose(gathered["grad_a"], ours[r]["grad_a"], atol=1e-6)
        # ... and without it (lightly's default) variance and covariance are per process
        local = float(ranks[r]["lightly_local"]["loss"])
        assert local == pytest.approx(float(vicreg_loss(z_a[6 * r:6 * r + 6], z_b[6 * r:6 * r + 6])), rel=1e-5)
        assert abs(local - float(ours[r]["loss"])) > 0.05 * float(ours[r]["loss"])


GLOBAL_BATCH = 8
BASE = ["method.name=vicreg", "model.backbone=vit_tiny", "model.patch_size=4", "vicreg.hidden_dim=32",
        "vicreg.output_dim=16", "vicreg.batchnorm=false", "train.epochs=1", "optim.name=sgd"]


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

SIGNATURE = ["method.name=vicreg", "data.image_size=8", "model.width_multiplier=0.125", "vicreg.hidden_dim=64",
             "vicreg.output_dim=32", "train.batch_size=64", "views.global_scale=[0.4,1.0]", "views.hflip=0.0",
             "views.hue=0.0", "views.saturation=0.0", "views.grayscale=0.0", "views.solarize=[0.0,0.0]",
             "optim.name=lars"]


def test_without_the_variance_term_the_embeddings_fall_together():
    """variance_weight = 0 leaves invariance + covariance, both 0 for a constant output: the
    projections shrink onto one point (per-dimension std over the test split -> 0) while the
    healthy run keeps them spread; the unweighted hinge in the logs reads its collapsed value
    1 - sqrt(1e-4) = 0.99."""
    healthy, healthy_logs = train_on_digits(SIGNATURE)
    switched, switched_logs = train_on_digits([*SIGNATURE, "vicreg.variance_weight=0"])
    std_healthy, std_switched = float(healthy.std(0).mean()), float(switched.std(0).mean())
    assert std_healthy > 0.2
    assert std_switched < 0.05 and std_switched < std_healthy / 10
    assert switched_logs["loss_variance"] > 0.98 and healthy_logs["loss_variance"] < 0.8
    assert switched_logs["loss_invariance"] < 1e-3 and switched_logs["loss_covariance"] < 1e-3


# ---- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_end_to_end_on_digits_and_evaluates_from_the_cli(tmp_path, capsys):
    from nocollapse.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", "digits/vicreg", "--out", str(out), "--set", "data.image_size=8",
            "model.width_multiplier=0.125", "vicreg.hidden_dim=64", "vicreg.output_dim=32", "train.epochs=2",
            "train.batch_size=64", "train.progress=false", "train.threads=1", "eval.batch_size=256",
            "diagnostics.plots=false"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "vicreg" and summary["variance_weight"] == 25.0
    assert 0.3 < summary["knn_top1"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(math.isfinite(r["loss"]) and "loss_variance" in r for r in steps)
    capsys.readouterr()
    assert main(["eval", str(out), "--knn", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["knn"]["knn_k20_t0.07"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)
    assert main(["diagnose", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedding_rankme"] > 1.0 and report["bottleneck_embedding_std"] > 0
    assert "unique_prototypes" not in report and "prototype_utilization" not in report
