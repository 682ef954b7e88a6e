"""SimSiam: the loss against hand-derived values and lightly, the stop-gradient, the heads, the
constant predictor learning rate, 2-process parity, the failure switch (no stop-gradient) on
digits, and a digits run from the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nocollapse.config import ConfigError, build_config
from nocollapse.losses.negative_cosine import negative_cosine, simsiam_loss
from test_byol import assert_parity, cli_run_then_eval_and_diagnose, watch_training

HEADS = ["simsiam.hidden_dim=32", "simsiam.output_dim=16", "simsiam.predictor_hidden_dim=8"]
SMALL = ["method.name=simsiam", "model.width_multiplier=0.125", *HEADS]


def _method(*overrides: str):
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone

    cfg, _ = build_config(overrides=[*SMALL, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=10)


def _crops(n: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 8, 8, generator=gen) for _ in range(2)]


# ---- the loss -----------------------------------------------------------------------------

def test_loss_by_hand():
    e = torch.eye(4)
    other = e.roll(1, dims=1)
    assert float(simsiam_loss(e, 2 * e, 0.3 * e, e)) == pytest.approx(-1.0, abs=1e-6)   # p = z (any scale)
    assert float(simsiam_loss(e, e, other, other)) == pytest.approx(0.0, abs=1e-6)      # orthogonal
    assert float(simsiam_loss(e, e, -e, -e)) == pytest.approx(1.0, abs=1e-6)            # opposite
    assert float(simsiam_loss(e, e, other, e)) == pytest.approx(-0.5, abs=1e-6)         # one of each
    assert float(negative_cosine(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]]))) == pytest.approx(-24 / 25)


def test_stop_gradient_and_its_failure_switch():
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(4, 3, generator=gen) for _ in range(4)]
    p1, p2, z1, z2 = (t.clone().requires_grad_(True) for t in base)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None and p1.grad.abs().sum() > 0
    # without the stop-gradient the projections get the gradient of -cos / 2 as well
    p1, p2, z1, z2 = (t.clone().requires_grad_(True) for t in base)
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    w1, w2 = (t.clone().requires_grad_(True) for t in base[2:])
    (-0.5 * F.cosine_similarity(base[0], w2).mean() - 0.5 * F.cosine_similarity(base[1], w1).mean()).backward()
    assert torch.allclose(z1.grad, w1.grad, atol=1e-7) and torch.allclose(z2.grad, w2.grad, atol=1e-7)
    assert z1.grad.abs().sum() > 0


def test_loss_and_gradients_match_lightly():
    """``L = NC(p1, z2) / 2 + NC(p2, z1) / 2`` with lightly's NegativeCosineSimilarity, which
    does not detach: the caller detaches z, as lightly's SimSiam example does."""
    from lightly.loss import NegativeCosineSimilarity

    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    ours = [t.clone().requires_grad_(True) for t in base]
    theirs = [t.clone().requires_grad_(True) for t in base]
    loss = simsiam_loss(*ours)
    loss.backward()
    nc = NegativeCosineSimilarity()
    p1, p2, z1, z2 = theirs
    reference = 0.5 * nc(p1, z2.detach()) + 0.5 * nc(p2, z1.detach())
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-6)
    for a, b in zip(ours[:2], theirs[:2]):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
    # without the stop-gradient: lightly's loss as it is, gradients into z included
    ours = [t.clone().requires_grad_(True) for t in base]
    theirs = [t.clone().requires_grad_(True) for t in base]
    simsiam_loss(*ours, stop_gradient=False).backward()
    p1, p2, z1, z2 = theirs
    (0.5 * nc(p1, z2) + 0.5 * nc(p2, z1)).backward()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_loss_is_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(16, 32, generator=gen) for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = simsiam_loss(*(t.bfloat16() for t in tensors))
    assert under.dtype == torch.float32
    rounded = simsiam_loss(*(t.bfloat16().float() for t in tensors))
    assert float(under) == pytest.approx(float(rounded), abs=1e-6)
    assert float(under) == pytest.approx(float(simsiam_loss(*tensors)), abs=0.01)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        simsiam_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        negative_cosine(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ConfigError, match="local_crops"):
        build_config(overrides=[*SMALL, "views.local_crops=2"])
    with pytest.raises(ConfigError, match="simsiam.predictor_hidden_dim"):
        build_config(overrides=[*SMALL, "simsiam.predictor_hidden_dim=0"])
    with pytest.raises(ConfigError, match="simsiam"):
        build_config(overrides=["method.name=byol", "simsiam.stop_gradient=false"])


# ---- the method ---------------------------------------------------------------------------

def test_heads_are_the_papers():
    _, method = _method("simsiam.layers=3")
    projector = [type(m).__name__ for m in method.encoder.projector.mlp]
    assert projector == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    linears = [m for m in method.encoder.projector.mlp if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None for m in linears)                    # every one is followed by a BN
    assert not method.encoder.projector.mlp[-1].affine              # output BN without affine
    predictor = list(method.predictor.mlp)
    assert [type(m).__name__ for m in predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert predictor[0].out_features == 8 and predictor[0].bias is None and predictor[-1].bias is not None
    # without BatchNorm: no BN anywhere, and the layers get their biases back
    _, bare = _method("simsiam.batchnorm=false")
    head_layers = [*bare.encoder.projector.mlp, *bare.predictor.mlp]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head_layers)
    assert all(m.bias is not None for m in head_layers if isinstance(m, torch.nn.Linear))
    assert method.eval_backbone() is method.encoder.backbone and method.uniform_loss() is None


def test_step_outputs_what_the_monitor_reads():
    _, method = _method()
    crops = _crops()
    out = method(crops, 0)
    assert out.loss.dtype == torch.float32 and -1.0 <= float(out.loss.detach()) <= 1.0
    # each view is a batch of its own for BatchNorm (the reference code's two forward passes)
    assert method.encoder.projector.mlp[1].num_batches_tracked.item() == 2
    with torch.no_grad():
        features, z1 = method.encoder([crops[0]])
    assert torch.allclose(out.embeddings, F.normalize(z1, dim=1), atol=1e-6)
    assert not out.embeddings.requires_grad and out.features.shape == features.shape
    assert out.logs["z_std"] == pytest.approx(float(F.normalize(z1, dim=1).std(0).mean()), abs=1e-6)


def test_predictor_keeps_the_peak_learning_rate():
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.utils.optim import build_optimizer, set_hyperparameters

    cfg, method = _method("optim.name=sgd")
    predictor = {id(p) for p in method.predictor.parameters()}
    groups = method.parameter_groups()
    assert [bool(g.get("fixed_lr")) for g in groups] == [False, False, True, True]
    assert {id(p) for g in groups if g.get("fixed_lr") for p in g["params"]} == predictor
    optimizer = build_optimizer(cfg.optim, groups, peak_lr=0.3)
    optimisation_step(method, method, optimizer, _crops(), 0, 0.01, 1e-4)
    for g in optimizer.param_groups:
        assert g["lr"] == (0.3 if g.get("fixed_lr") else 0.01)
        assert g["weight_decay"] == (1e-4 if g["apply_weight_decay"] else 0.0)   # decay still scheduled
    set_hyperparameters(optimizer, 0.002, 0.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.002, 0.002, 0.3, 0.3]
    # decay on every parameter (the paper's setting) keeps the predictor apart
    cfg, method = _method("optim.name=sgd", "optim.decay_norms_and_biases=true")
    predictor = {id(p) for p in method.predictor.parameters()}
    merged = build_optimizer(cfg.optim, method.parameter_groups(), peak_lr=0.3).param_groups
    assert [(bool(g.get("fixed_lr")), g["apply_weight_decay"]) for g in merged] == [(False, True), (True, True)]
    assert {id(p) for p in merged[1]["params"]} == predictor
    # off: one schedule for everything
    _, method = _method("simsiam.fixed_predictor_lr=false")
    assert not any(g.get("fixed_lr") for g in method.parameter_groups())


def test_trainer_gives_the_predictor_the_scaled_peak_learning_rate(tmp_path):
    from nocollapse.engine.trainer import Trainer

    cfg, _ = build_config(overrides=[*SMALL, "data.image_size=8", "train.batch_size=64", "optim.name=sgd",
                                     "optim.lr=0.4", "optim.warmup_epochs=1", "train.progress=false"])
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    trainer.logger.close()
    peak = 0.4 * 64 / 256
    assert max(trainer.lr_schedule) == pytest.approx(peak)
    fixed = [g for g in trainer.optimizer.param_groups if g.get("fixed_lr")]
    assert fixed and all(g["lr"] == pytest.approx(peak) for g in fixed)


# ---- two processes ------------------------------------------------------------------------

@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_joined_batch():
    """No collective in the loss: DDP's gradient average makes 2 x 4 samples equal 8 (BatchNorm
    off; the predictor at its fixed learning rate)."""
    assert_parity(["method.name=simsiam", "simsiam.batchnorm=false", *HEADS], ("encoder.", "predictor."))


# ---- the failure switch -------------------------------------------------------------------

SIMSIAM_DIGITS = ["method.name=simsiam", "simsiam.hidden_dim=64", "simsiam.output_dim=16",
                  "simsiam.predictor_hidden_dim=8", "simsiam.layers=2", "optim.name=sgd", "optim.lr=0.5",
                  "optim.warmup_epochs=0", "optim.weight_decay=1e-5", "optim.weight_decay_end=1e-5",
                  "optim.clip_grad=0"]


def test_without_stop_gradient_the_representation_collapses():
    """The paper's Fig. 2 as its signature: without the stop-gradient the loss runs to -1 and the
    L2-normalised projections fall together, in 40 steps; the healthy run keeps them spread.

    The projector's output BatchNorm gives every dimension unit variance over the batch, so the
    collapsed projections cannot all be equal: a few samples carry the variance opposite to the
    rest, and with 64 samples the std floor is near 0.25 / sqrt(d), not 0."""
    healthy = watch_training(SIMSIAM_DIGITS, steps=40)
    collapsed = watch_training([*SIMSIAM_DIGITS, "simsiam.stop_gradient=false"], steps=40)
    spread = 1 / math.sqrt(16)
    assert healthy["std"] > 0.7 * spread and healthy["direction"] < 0.75 and healthy["loss"] > -0.75
    assert collapsed["std"] < 0.5 * spread and collapsed["std"] < 0.6 * healthy["std"]
    assert collapsed["direction"] > 0.85 and collapsed["loss"] < -0.85


# ---- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_simsiam_trains_end_to_end_on_digits_from_the_cli(tmp_path):
    summary = cli_run_then_eval_and_diagnose(tmp_path, "digits/simsiam", SIMSIAM_DIGITS[1:5])
    assert summary["method"] == "simsiam" and summary["stop_gradient"] is True
    assert 0.3 < summary["knn_top1"] <= 1.0
