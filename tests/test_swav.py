"""SwAV: the swapped prediction and its codes by hand and against lightly's SwaVLoss, the
prototypes (unit rows, frozen first steps, decoupled by the same switch), the queue, 2-process
parity, and the collapse that the equipartition prevents (``swav.codes=softmax``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distributed_helpers import run_distributed
from nocollapse.config import ConfigError, build_config
from nocollapse.engine.trainer import optimisation_step
from nocollapse.losses.sinkhorn import sinkhorn_knopp
from nocollapse.losses.swav import swapped_prediction_loss, swav_codes
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.utils.optim import build_optimizer

K, B = 12, 8


def _scores(crops: int, batch: int = B, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(batch, K, generator=gen), dim=1) for _ in range(crops)]


# ---- the loss and the codes ---------------------------------------------------------------

def test_uniform_scores_give_uniform_codes_and_a_loss_of_ln_k():
    scores = [torch.zeros(B, K) for _ in range(4)]
    codes = [swav_codes(s, 0.05) for s in scores[:2]]
    for q in codes:
        assert torch.allclose(q, torch.full((B, K), 1.0 / K))
    assert float(swapped_prediction_loss(scores, codes, 0.1)) == pytest.approx(math.log(K), rel=1e-6)


def test_loss_by_hand_for_two_crops():
    # one sample, K = 2: crop 0 predicts [3/4, 1/4], crop 1 [1/2, 1/2]; codes q0 = [1, 0], q1 = [0, 1]
    # term a=0 (predicted by crop 1): -log 1/2; term a=1 (predicted by crop 0): -log 1/4; mean 1.5 log 2
    scores = [torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    assert float(swapped_prediction_loss(scores, codes, temperature=1.0)) == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_sinkhorn_codes_are_balanced_and_softmax_codes_are_not():
    skewed = [s + torch.linspace(0, 1, K) for s in _scores(1, batch=64)]   # every sample leans to the last prototype
    q = swav_codes(skewed[0], 0.05, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((K,), 64 / K), rtol=1e-2)
    soft = swav_codes(skewed[0], 0.05, codes="softmax")
    assert torch.allclose(soft, torch.softmax(skewed[0] / 0.05, dim=1))
    assert float(soft.sum(0).max()) > 3 * 64 / K


def test_codes_with_a_queue_are_those_of_the_joined_problem():
    scores, queue = _scores(1)[0], _scores(1, batch=24, seed=3)[0]
    joined = sinkhorn_knopp(torch.cat([queue, scores]), 0.05, 3, row_shift=False)[-B:]
    assert torch.allclose(swav_codes(scores, 0.05, 3, queue_scores=queue), joined)
    assert not torch.allclose(joined, swav_codes(scores, 0.05, 3), atol=1e-3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="codes must be"):
        swav_codes(torch.zeros(2, 3), 0.05, codes="argmax")
    with pytest.raises(ValueError, match="at least one assignment crop"):
        swapped_prediction_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)], 0.1)


@pytest.mark.parametrize("queue", [False, True])
def test_loss_and_gradients_equal_lightlys_swav_loss(queue):
    lightly_loss = pytest.importorskip("lightly.loss")
    high = [s.clone().requires_grad_(True) for s in _scores(2)]
    low = [s.clone().requires_grad_(True) for s in _scores(3, seed=1)]
    queued = _scores(2, batch=16, seed=2) if queue else None
    ours_high = [s.detach().clone().requires_grad_(True) for s in high]
    ours_low = [s.detach().clone().requires_grad_(True) for s in low]

    reference = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(
        high, low, queue_outputs=queued)
    codes = [swav_codes(s, 0.05, 3, queue_scores=None if queued is None else queued[a]) for a, s in enumerate(ours_high)]
    ours = swapped_prediction_loss([*ours_high, *ours_low], codes, 0.1)
    reference.sum().backward()
    ours.backward()
    # lightly appends the queue after the batch, we put it in front: Sinkhorn's rows do not depend on the order
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for mine, theirs in zip([*ours_high, *ours_low], [*high, *low]):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)


def test_loss_is_fp32_under_bf16_autocast():
    scores = _scores(4)
    codes = [swav_codes(s, 0.05) for s in scores[:2]]
    exact = swapped_prediction_loss(scores, codes, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = swapped_prediction_loss([s.bfloat16() for s in scores], codes, 0.1)
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(exact), abs=0.02)


# ---- the method ---------------------------------------------------------------------------

TINY = ["method.name=swav", "method.prototypes=learned", "model.width_multiplier=0.125", "method.num_prototypes=32",
        "method.head.hidden_dim=32", "method.head.bottleneck_dim=16", "views.local_crops=2", "train.epochs=1",
        "train.batch_size=8"]


def _method(*overrides, steps_per_epoch=4):
    cfg, _ = build_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch)


def _crops(seed: int, batch: int = B):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(2)] + \
           [torch.randn(batch, 3, 4, 4, generator=gen) for _ in range(2)]


def _train(method, cfg, steps: int, start: int = 0):
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    return [optimisation_step(method, method, optimizer, _crops(step), step, 0.05, 0.0)
            for step in range(start, start + steps)]


def test_learned_prototypes_stay_unit_rows_and_are_frozen_for_the_first_epoch():
    cfg, method = _method("method.freeze_last_layer_epochs=0.5")     # 2 of the 4 steps per epoch
    assert method.prototype_set().kind == "learned" and method.prototype_set().teacher is None
    start = method.prototype_vectors().clone()
    assert torch.allclose(start.norm(dim=1), torch.ones(32), atol=1e-6)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    for step in range(4):
        optimisation_step(method, method, optimizer, _crops(step), step, 0.05, 0.0)
        vectors = method.prototype_vectors()
        assert torch.allclose(vectors.norm(dim=1), torch.ones(32), atol=1e-5), step
        assert (float((vectors - start).abs().max()) < 1e-6) == (step < 2), step   # renormalising moves no row
    assert method.eval_network_name == "backbone" and method.eval_backbone() is method.student.backbone


def test_decoupled_prototypes_by_the_same_switch_take_no_gradient():
    cfg, method = _method("method.prototypes=decoupled")
    assert method.prototype_set().kind == "decoupled" and method.prototype_set() is method.gmm
    optimised = {id(p) for g in method.parameter_groups() for p in g["params"]}
    assert all(id(b) not in optimised for b in method.gmm.buffers())
    before = method.gmm.means.clone()
    outputs = _train(method, cfg, 3)
    assert all(torch.isfinite(loss) for loss, _ in outputs)
    assert not torch.equal(before, method.gmm.means)
    assert method.mixture_weights() is not None and "gmm_weight_perplexity" in outputs[-1][1].logs


def test_queue_fills_from_its_start_and_joins_the_codes_once_full():
    cfg, method = _method("swav.queue_length=20", "swav.queue_start_epochs=0.25")   # from step 1
    assert method.queue.shape == (2, 16, 16)              # trimmed to a multiple of the batch of 8
    outputs = _train(method, cfg, 5)
    used = [out.logs["queue_in_use"] for _, out in outputs]
    assert used == [0.0, 0.0, 0.0, 1.0, 1.0]              # filled by steps 1 and 2, used from step 3
    assert int(method.queue_filled) == 16
    # the newest rows are the last step's assignment-crop embeddings, the queue is saved
    assert torch.equal(method.queue[0, :B], outputs[-1][1].embeddings)
    assert {"queue", "queue_filled"} <= set(method.state_dict())


def test_a_skipped_step_leaves_the_queue():
    cfg, method = _method("swav.queue_length=16", "swav.queue_start_epochs=0")
    _train(method, cfg, 1)
    queue = method.queue.clone()
    bad = [c.clone() for c in _crops(9)]
    bad[0][0, 0, 0, 0] = float("nan")
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    _, out = optimisation_step(method, method, optimizer, bad, 1, 0.05, 0.0)
    assert out is None and torch.equal(method.queue, queue) and int(method.queue_filled) == 8


def test_settings_of_a_teacher_do_not_apply_and_softmax_codes_are_a_choice():
    with pytest.raises(ConfigError, match="teacher_momentum"):
        build_config(overrides=["method.name=swav", "method.teacher_momentum=0.9"])
    with pytest.raises(ConfigError, match="swav.codes"):
        build_config(overrides=["method.name=swav", "swav.codes=argmax"])
    with pytest.raises(ConfigError, match="swav.queue_start_epochs"):
        build_config(overrides=["method.name=swav", "swav.queue_start_epochs=3"])


def test_learned_prototypes_keep_their_checkpoint_names(tmp_path):
    cfg, method = _method()
    state = method.state_dict()
    assert "student_prototypes.layer.weight" in state and not any(k.startswith("prototypes.") for k in state)
    _train(method, cfg, 1)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    _, other = _method()
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(other.prototype_vectors(), method.prototype_vectors())


# ---- two processes ------------------------------------------------------------------------

GLOBAL_BATCH = 8


def _swav_steps(rank: int, world_size: int, overrides: list[str]) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from nocollapse.engine.trainer import _no_buffer_sync
    from nocollapse.utils import distributed as dist_utils

    per_rank = GLOBAL_BATCH // world_size
    cfg, _ = build_config(overrides=["method.name=swav", "model.backbone=vit_tiny", "model.patch_size=4",
                                     "method.num_prototypes=32", "method.head.hidden_dim=32",
                                     "method.head.bottleneck_dim=16", "train.epochs=1", "optim.name=sgd",
                                     f"train.batch_size={per_rank}", *overrides])
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=10)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    model = DistributedDataParallel(method, **_no_buffer_sync()) if world_size > 1 else method
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    losses, queue_used = [], []
    for step in range(4):
        crops = [c[rank * per_rank:(rank + 1) * per_rank] for c in _crops(step, GLOBAL_BATCH)]
        loss, out = optimisation_step(model, method, optimizer, crops, step, 0.05, 1e-4, clip_grad=3.0)
        losses.append(dist_utils.all_reduce_mean(loss.clone()))
        queue_used.append(out.logs["queue_in_use"])
    # each process keeps its own rows of the queue
    state = {k: v for k, v in method.state_dict().items() if k not in ("queue", "queue_filled")}
    return {"losses": torch.stack(losses), "state": state, "initial": initial, "queue_used": queue_used}


CASES = {
    "learned": ["method.prototypes=learned", "method.freeze_last_layer_epochs=0"],
    "decoupled": ["method.prototypes=decoupled"],
    "learned-queue": ["method.prototypes=learned", "method.freeze_last_layer_epochs=0", "swav.queue_length=16",
                      "swav.queue_start_epochs=0"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", [pytest.param("learned", marks=pytest.mark.long), "decoupled", "learned-queue"])
def test_two_processes_equal_one_process_on_the_joined_batch(case):
    single = _swav_steps(0, 1, CASES[case])
    ranks = run_distributed(_swav_steps, 2, args=(CASES[case],))
    for r, result in enumerate(ranks):
        assert torch.allclose(result["losses"], single["losses"], atol=1e-5), (case, r)
        assert result["queue_used"] == single["queue_used"], (case, r)
        for name, value in single["state"].items():
            assert torch.allclose(result["state"][name].float(), value.float(), atol=2e-5), (case, r, name)
    moved = [k for k, v in single["state"].items() if not torch.equal(v, single["initial"][k])]
    assert any(k.startswith("student.") for k in moved), case
    if "queue" in case:
        assert single["queue_used"] == [0.0, 0.0, 1.0, 1.0]


# ---- the failure switch, end to end on digits -----------------------------------------------

def _digits_run(tmp_path, name: str, *extra: str) -> dict:
    from conftest import TINY as DIGITS
    from nocollapse.cli import main

    out = tmp_path / name
    assert main(["train", "--out", str(out), "--set", *DIGITS, "train.epochs=3", "method.name=swav",
                 "method.prototypes=learned", "eval.knn_init=false", "diagnostics.plots=false", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_without_sinkhorn_every_sample_falls_on_one_prototype_and_with_it_none_does(tmp_path):
    healthy = _digits_run(tmp_path, "sinkhorn")
    broken = _digits_run(tmp_path, "softmax", "swav.codes=softmax")
    # the test images' arg-max prototypes: spread with the equipartition, one prototype without it
    assert broken["clusters"]["largest_fraction"] > 0.9 and broken["clusters"]["used"] <= 3
    assert healthy["clusters"]["largest_fraction"] < 0.5 and healthy["clusters"]["used"] >= 10
    alarms = {name: {a["name"] for a in run["alarms"]} for name, run in (("healthy", healthy), ("broken", broken))}
    assert "one_hot_collapse" in alarms["broken"] and "one_hot_collapse" not in alarms["healthy"]


@pytest.mark.slow
def test_swav_run_is_evaluated_diagnosed_and_exported(tmp_path, capsys):
    from nocollapse.cli import main

    _digits_run(tmp_path, "run", "method.prototypes=decoupled", "train.epochs=2")
    run = tmp_path / "run"
    assert main(["eval", str(run), "--knn"]) == 0
    assert main(["diagnose", str(run), "--json"]) == 0
    report = json.loads((run / "diagnosis.json").read_text())
    assert report["num_prototypes"] == 32 and "mixture" in report and report["source"]["method"] == "swav"
    assert main(["export", str(run), "--out", str(tmp_path / "backbone.pt")]) == 0
    assert (tmp_path / "backbone.pt").is_file()
