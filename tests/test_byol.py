"""BYOL: the loss against hand-derived values, the DeepMind form and lightly; the EMA target, its
schedule and its update after the optimiser step; 2-process parity; the failure switch (no
predictor) on digits; and a digits run from the CLI.

``train_steps`` and ``watch_training`` are shared with ``test_simsiam.py``.
"""

from __future__ import annotations

import json
import math
import tempfile

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.losses.negative_cosine import byol_loss

HEADS = ["byol.hidden_dim=32", "byol.output_dim=16", "byol.predictor_hidden_dim=32"]
SMALL = ["method.name=byol", "model.width_multiplier=0.125", *HEADS]


def _method(*overrides: str, steps_per_epoch: int = 10):
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone

    cfg, _ = build_config(overrides=[*SMALL, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=steps_per_epoch)


def _crops(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=gen) for _ in range(2)]


# ---- the loss -----------------------------------------------------------------------------

def test_loss_by_hand():
    e = torch.eye(4)
    # p = z: both directions 2 - 2 cos = 0; the scale of either vector does not matter
    assert float(byol_loss(e, 3 * e, e, 0.5 * e)) == pytest.approx(0.0, abs=1e-6)
    # orthogonal in both directions: 2 + 2
    other = e.roll(1, dims=1)
    assert float(byol_loss(e, e, other, other)) == pytest.approx(4.0, abs=1e-6)
    # opposite: the top of the range, 4 + 4
    assert float(byol_loss(e, e, -e, -e)) == pytest.approx(8.0, abs=1e-6)
    # one direction right, the other orthogonal
    assert float(byol_loss(e, e, other, e)) == pytest.approx(2.0, abs=1e-6)


def test_loss_is_the_deepmind_normalised_mse():
    """Per sample, the squared distance of the L2-normalised vectors summed over features, both
    directions added, then the mean over the batch."""
    gen = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(4))
    mse = lambda p, z: (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1)  # noqa: E731
    expected = (mse(p1, z2) + mse(p2, z1)).mean()
    assert float(byol_loss(p1, p2, z1, z2)) == pytest.approx(float(expected), abs=1e-6)


def test_target_gets_no_gradient():
    gen = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(4, 3, generator=gen).requires_grad_(True) for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_loss_and_gradients_match_lightly():
    """lightly's NegativeCosineSimilarity does not detach: detach the targets for it. The DeepMind
    form is ``4 + 2 NC(p1, z2) + 2 NC(p2, z1)`` (lightly's ResNet-50 benchmark uses the same
    terms without the 4)."""
    from lightly.loss import NegativeCosineSimilarity

    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    ours = [t.clone().requires_grad_(True) for t in base]
    theirs = [t.clone().requires_grad_(True) for t in base]
    loss = byol_loss(*ours)
    loss.backward()
    nc = NegativeCosineSimilarity()
    p1, p2, z1, z2 = theirs
    reference = 4 + 2 * nc(p1, z2.detach()) + 2 * nc(p2, z1.detach())
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    for a, b in zip(ours[:2], theirs[:2]):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_loss_is_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(16, 32, generator=gen) for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = byol_loss(*(t.bfloat16() for t in tensors))
    assert under.dtype == torch.float32
    # exact on the bf16-rounded inputs: the arithmetic itself ran in fp32
    rounded = byol_loss(*(t.bfloat16().float() for t in tensors))
    assert float(under) == pytest.approx(float(rounded), abs=1e-6)
    assert float(under) == pytest.approx(float(byol_loss(*tensors)), abs=0.02)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        byol_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="local_crops"):
        build_config(overrides=[*SMALL, "views.local_crops=2"])
    with pytest.raises(ConfigError, match="byol.momentum"):
        build_config(overrides=[*SMALL, "byol.momentum=1.5"])
    with pytest.raises(ConfigError, match="momentum_end"):
        build_config(overrides=[*SMALL, "byol.momentum=0.99", "byol.momentum_end=0.9"])
    with pytest.raises(ConfigError, match="byol"):
        build_config(overrides=["method.name=simclr", "byol.momentum=0.9"])


# ---- the method ---------------------------------------------------------------------------

def test_networks_target_and_evaluation():
    from nocollapse.utils.optim import build_optimizer

    cfg, method = _method()
    # projector and predictor: Linear(bias) -> BN -> ReLU -> Linear(no bias), as the DeepMind code
    for mlp in (method.online.projector, method.predictor):
        layers = [type(m).__name__ for m in mlp.mlp]
        assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert mlp.mlp[0].bias is not None and mlp.mlp[-1].bias is None
    # the target is an exact copy of backbone + projector that takes no gradient and is not trained
    online, target = dict(method.online.named_parameters()), dict(method.target.named_parameters())
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) and not target[k].requires_grad for k in online)
    trained = {id(p) for g in build_optimizer(cfg.optim, method.parameter_groups()).param_groups for p in g["params"]}
    assert trained == {id(p) for p in method.parameters() if p.requires_grad}
    assert not trained & {id(p) for p in method.target.parameters()}
    # evaluation: the online backbone (what the paper keeps)
    assert method.eval_backbone() is method.online.backbone and method.eval_network_name == "online backbone"
    assert method.uniform_loss() is None
    _, bare = _method("byol.predictor=false")
    assert isinstance(bare.predictor, torch.nn.Identity) and bare.describe() == "byol (no predictor)"
    assert bare.trainable_parameter_count() < method.trainable_parameter_count()


def test_step_outputs_what_the_monitor_reads():
    _, method = _method()
    crops = _crops()
    out = method(crops, 0)
    assert out.loss.dtype == torch.float32 and 0.0 <= float(out.loss.detach()) <= 8.0
    with torch.no_grad():
        features, z1 = method.online([crops[0]])
    assert torch.allclose(out.embeddings, F.normalize(z1, dim=1), atol=1e-6)
    assert not out.embeddings.requires_grad and torch.allclose(out.embeddings.norm(dim=1), torch.ones(8))
    assert out.features.shape == features.shape and not out.features.requires_grad
    assert out.logs["z_std"] == pytest.approx(float(F.normalize(z1, dim=1).std(0).mean()), abs=1e-6)
    assert out.logs["loss_byol"] == pytest.approx(float(out.loss.detach()))
    # the target normalises with batch statistics and keeps running statistics of its own
    bn = [m for m in method.target.modules() if isinstance(m, torch.nn.BatchNorm1d)][0]
    assert bn.training and bn.num_batches_tracked.item() == 2      # one batch per view


def test_momentum_schedule_is_the_papers_and_lightlys_shifted_by_one():
    """tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 over the run's K steps. lightly's
    cosine_schedule divides by max_steps - 1 and reaches the end value at the last step; ours
    (the paper's, the DeepMind code's) reaches it one step after the last, so ours at K steps is
    lightly's at K + 1."""
    from lightly.utils.scheduler import cosine_schedule as lightly_cosine

    cfg, method = _method("byol.momentum=0.99", "train.epochs=3", steps_per_epoch=7)
    k_total = 21
    assert len(method.momentum) == k_total
    for k in range(k_total):
        paper = 1 - (1 - 0.99) * (math.cos(math.pi * k / k_total) + 1) / 2
        assert method.at_step(method.momentum, k) == pytest.approx(paper, abs=1e-12)
        assert method.at_step(method.momentum, k) == pytest.approx(lightly_cosine(k, k_total + 1, 0.99, 1.0), abs=1e-12)
    assert method.momentum[0] == pytest.approx(0.99) and method.momentum[-1] < 1.0
    assert lightly_cosine(k_total - 1, k_total, 0.99, 1.0) == 1.0


def test_ema_update_matches_lightly_and_covers_parameters_only():
    import copy

    from lightly.models.utils import update_momentum

    _, method = _method("byol.momentum=0.9", "byol.momentum_end=0.9")
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(torch.randn_like(p))
    method(_crops(), 0)                                   # the target's own BN statistics move
    target_before = copy.deepcopy(method.target)
    buffers = {k: v.clone() for k, v in method.target.named_buffers()}
    reference = copy.deepcopy(method.target)
    update_momentum(method.online, reference, m=0.9)
    method.on_after_optimizer_step(0)
    for (name, ours), theirs, before in zip(method.target.named_parameters(), reference.parameters(),
                                            target_before.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name
        assert not torch.equal(ours, before), name
    for name, value in method.target.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_target_follows_after_the_optimiser_step():
    """With momentum 0 the target is the online network after the step (the update runs after
    the optimiser step, not before): the configuration of the paper's tau = 0 row."""
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.utils.optim import build_optimizer

    cfg, method = _method("byol.momentum=0", "byol.momentum_end=0", "optim.name=sgd")
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    before = [p.clone() for p in method.online.parameters()]
    optimisation_step(method, method, optimizer, _crops(), 0, 0.1, 0.0)
    online = list(method.online.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(online, before))
    assert all(torch.equal(t, o) for t, o in zip(method.target.parameters(), online))


# ---- two processes ------------------------------------------------------------------------

GLOBAL_BATCH = 8
VIT = ["model.backbone=vit_tiny", "model.patch_size=4", "train.epochs=1", "optim.name=sgd"]


def train_steps(rank: int, world_size: int, overrides: list[str], steps: int = 3) -> dict:
    """``steps`` optimisation steps of the method ``overrides`` name on this rank's share of a
    fixed global batch (two 8 px views), DDP-wrapped as the trainer does; shared with
    ``test_simsiam.py``."""
    from torch.nn.parallel import DistributedDataParallel

    from nocollapse.engine.trainer import _no_buffer_sync, optimisation_step
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone
    from nocollapse.utils import distributed as dist_utils
    from nocollapse.utils.optim import build_optimizer

    cfg, _ = build_config(overrides=[*VIT, *overrides])
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=10)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    model = DistributedDataParallel(method, **_no_buffer_sync()) if world_size > 1 else method
    optimizer = build_optimizer(cfg.optim, method.parameter_groups(), peak_lr=0.2)
    per_rank = GLOBAL_BATCH // world_size
    crops = [c[rank * per_rank:(rank + 1) * per_rank] for c in _crops(GLOBAL_BATCH, seed=5)]
    losses = []
    for step in range(steps):
        loss, _ = optimisation_step(model, method, optimizer, crops, step, 0.05, 1e-4, clip_grad=3.0)
        losses.append(dist_utils.all_reduce_mean(loss.clone()))
    return {"losses": torch.stack(losses), "state": method.state_dict(), "initial": initial}


def assert_parity(overrides: list[str], moved_prefixes: tuple[str, ...]) -> None:
    single = train_steps(0, 1, overrides)
    ranks = run_distributed(train_steps, 2, args=(overrides,))
    for r, result in enumerate(ranks):
        assert torch.allclose(result["losses"], single["losses"], atol=1e-5), r
        for name, value in single["state"].items():
            assert torch.allclose(result["state"][name].float(), value.float(), atol=2e-5), (r, name)
    moved = [k for k, v in single["state"].items() if not torch.equal(v, single["initial"][k])]
    for prefix in moved_prefixes:
        assert any(k.startswith(prefix) for k in moved), prefix


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_joined_batch():
    """No collective in the loss: DDP's gradient average makes 2 x 4 samples equal 8, and the
    EMA target, updated from equal online weights, stays equal too (BatchNorm off: per-process
    statistics would differ from the joined batch's)."""
    assert_parity(["method.name=byol", "byol.batchnorm=false", "byol.momentum=0.9", *HEADS],
                  ("online.", "predictor.", "target."))


# ---- the failure switch -------------------------------------------------------------------

TINY = ["data.image_size=8", "model.width_multiplier=0.125", "train.batch_size=64", "train.epochs=3",
        "train.progress=false", "train.threads=1", "eval.batch_size=256"]


def watch_training(overrides: list[str], steps: int) -> dict[str, float]:
    """Train on digits through the engine's own pieces (data pipeline, schedules, optimiser,
    ``optimisation_step``) for ``steps`` steps; the loss, the std of the L2-normalised embeddings
    and the norm of their mean direction, each averaged over the last 10 steps. Shared with
    ``test_simsiam.py``."""
    from nocollapse.diagnostics.embeddings import embedding_std, mean_direction_norm
    from nocollapse.engine.trainer import Trainer, optimisation_step

    cfg, _ = build_config(overrides=[*TINY, *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        trainer.setup()
        trainer.model.train()
        record, step, epoch = [], 0, 0
        while step < steps:
            for batch in trainer.batches.epoch(epoch):
                loss, out = optimisation_step(trainer.model, trainer.method, trainer.optimizer,
                                              batch.without_labels(), step, float(trainer.lr_schedule[step]),
                                              float(trainer.wd_schedule[step]), cfg.optim.clip_grad)
                record.append((float(loss), embedding_std(out.embeddings), mean_direction_norm(out.embeddings)))
                step += 1
                if step == steps:
                    break
            epoch += 1
        trainer.logger.close()
    tail = np.array(record[-10:])
    return {"loss": float(tail[:, 0].mean()), "std": float(tail[:, 1].mean()), "direction": float(tail[:, 2].mean())}


BYOL_DIGITS = ["method.name=byol", "byol.hidden_dim=64", "byol.output_dim=16", "byol.predictor_hidden_dim=64",
               "byol.momentum=0.99", "optim.name=lars", "optim.lr=1.0", "optim.warmup_epochs=0",
               "optim.weight_decay=1e-5", "optim.weight_decay_end=1e-5", "optim.clip_grad=0"]


def test_without_predictor_the_representation_collapses():
    """The paper's Table 5 (no predictor: 0.2 %) as its signature: the L2-normalised projections
    fall together (per-dimension std towards 0, mean direction norm towards 1), in 40 steps; the
    healthy run keeps them spread (std near 1/sqrt(d))."""
    healthy = watch_training(BYOL_DIGITS, steps=40)
    collapsed = watch_training([*BYOL_DIGITS, "byol.predictor=false"], steps=40)
    spread = 1 / math.sqrt(16)
    assert healthy["std"] > 0.5 * spread and healthy["direction"] < 0.8
    assert collapsed["std"] < 0.1 * spread and collapsed["direction"] > 0.98
    # the loss falls towards its minimum: the target is trivially predictable
    assert collapsed["loss"] < 0.5 * healthy["loss"]


# ---- end to end ---------------------------------------------------------------------------

def cli_run_then_eval_and_diagnose(tmp_path, config: str, overrides: list[str]) -> dict:
    """``nocollapse train --config <config>`` at tiny size, then ``eval --knn`` and ``diagnose`` on
    the run directory; the summary. Shared with ``test_simsiam.py``."""
    from nocollapse.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", config, "--out", str(out), "--set", *TINY, "train.epochs=2",
                 "train.log_every=5", *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any("z_std" in r for r in records) and any("embedding_std" in r for r in records)
    assert main(["eval", str(out), "--knn"]) == 0 and (out / "eval.json").is_file()
    assert main(["diagnose", str(out)]) == 0 and (out / "diagnosis.json").is_file()
    return summary


@pytest.mark.slow
def test_byol_trains_end_to_end_on_digits_from_the_cli(tmp_path):
    summary = cli_run_then_eval_and_diagnose(tmp_path, "digits/byol", BYOL_DIGITS[1:4])
    assert summary["method"] == "byol" and summary["predictor"] is True
    assert 0.3 < summary["knn_top1"] <= 1.0
