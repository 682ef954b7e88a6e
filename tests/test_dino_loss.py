"""DINO loss, centering and schedules against values derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precision_helpers import bf16_errors

from nocollapse.utils.schedules import cosine_schedule, warmup_constant_schedule
from nocollapse.losses import dino as dino_module
from nocollapse.losses.dino import (dino_loss, dino_prototype_loss, row_blocks, softmax_cross_entropy_sum,
                                   teacher_probabilities, updated_center)


def test_dino_loss_two_crops_by_hand():
    # Student temperature 1. Crop 0 logits [0, 0] -> p = [1/2, 1/2]; crop 1 logits [ln 3, 0]
    # -> p = [3/4, 1/4]. Teacher targets q0 = [1/2, 1/2], q1 = [1, 0].
    # Pairs: (student 1, teacher 0): -(1/2 ln 3/4 + 1/2 ln 1/4) = 1/2 ln(16/3)
    #        (student 0, teacher 1): -ln 1/2 = ln 2
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    teacher = [torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])]
    expected = (0.5 * math.log(16 / 3) + math.log(2)) / 2
    assert dino_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_student_temperature_scales_logits():
    # With temperature 0.5 the logits [ln 3 / 2, 0] become [ln 3, 0] again.
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0) / 2, 0.0]])]
    teacher = [torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])]
    expected = (0.5 * math.log(16 / 3) + math.log(2)) / 2
    assert dino_loss(student, teacher, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_uniform_equals_log_k():
    k = 4096
    student = [torch.zeros(3, k) for _ in range(4)]
    teacher = [torch.full((3, k), 1.0 / k) for _ in range(2)]
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(math.log(k), rel=1e-5)


def _oracle(student, teacher, temp):
    """Per-sample loops in numpy, written independently of the library."""
    s = [x.double().numpy() / temp for x in student]
    total, pairs = 0.0, 0
    for j, q in enumerate(teacher):
        q = q.double().numpy()
        for i, logits in enumerate(s):
            if i == j:
                continue
            per_sample = []
            for b in range(logits.shape[0]):
                z = logits[b] - logits[b].max()
                log_p = z - np.log(np.exp(z).sum())
                per_sample.append(-(q[b] * log_p).sum())
            total += np.mean(per_sample)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_matches_loop_oracle_with_multicrop(n_local):
    gen = torch.Generator().manual_seed(0)
    batch, k = 5, 7
    student = [torch.randn(batch, k, generator=gen) for _ in range(2 + n_local)]
    teacher = [torch.softmax(torch.randn(batch, k, generator=gen) / 0.04, dim=1) for _ in range(2)]
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(_oracle(student, teacher, 0.1), rel=1e-5)
    # Pair count: 2 teacher views x (2 + n_local) crops minus the 2 same-view pairs.


def test_dino_loss_single_crop_is_rejected():
    with pytest.raises(ValueError, match="i != j"):
        dino_loss([torch.zeros(1, 3)], [torch.ones(1, 3) / 3], 0.1)


def test_teacher_probabilities_center_and_temperature_by_hand():
    t = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.5, 0.0]])
    # (t - c) / 0.5 = [1, 0] -> softmax = [e / (e + 1), 1 / (e + 1)]
    q = teacher_probabilities(t, 0.5, c)
    e = math.e
    assert q[0, 0].item() == pytest.approx(e / (e + 1), rel=1e-6)
    assert q[0, 1].item() == pytest.approx(1 / (e + 1), rel=1e-6)
    # Without centering: t / 0.5 = [2, 0]
    q = teacher_probabilities(t, 0.5, None)
    assert q[0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1), rel=1e-6)


def test_center_update_by_hand():
    center = torch.tensor([[0.0, 1.0]])
    new = updated_center(center, torch.tensor([[2.0, 4.0]]), 0.9)
    assert torch.allclose(new, torch.tensor([[0.2, 0.9 + 0.4]]))


def test_teacher_temperature_warmup_schedule():
    sched = warmup_constant_schedule(0.04, 0.07, warmup_steps=3, total_steps=5)
    assert np.allclose(sched, [0.04, 0.05, 0.06, 0.07, 0.07])


def test_cosine_schedule_by_hand():
    sched = cosine_schedule(1.0, 0.0, total_steps=4)
    expected = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert np.allclose(sched, expected)
    warm = cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2, warmup_start=0.0)
    assert np.allclose(warm[:2], [0.0, 0.5])
    assert warm[2] == pytest.approx(1.0)
    assert len(warm) == 6 and np.all(np.diff(warm[2:]) < 0)


def test_sinkhorn_targets_are_distributions_with_equal_prototype_mass():
    from nocollapse.losses.sinkhorn import sinkhorn_knopp

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=gen) * 3
    logits[:, 0] += 5          # one prototype dominates the raw softmax
    q = sinkhorn_knopp(logits, temperature=1.0, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), rtol=1e-3)
    raw = torch.softmax(logits, 1).sum(0)
    assert raw[0] > 25 and q.sum(0)[0] < 8.1     # the dominant prototype (half the mass) is rebalanced


def test_sinkhorn_of_uniform_logits_is_uniform():
    from nocollapse.losses.sinkhorn import sinkhorn_knopp

    q = sinkhorn_knopp(torch.zeros(6, 4), temperature=0.1)
    assert torch.allclose(q, torch.full((6, 4), 0.25))


# --------------------------------------------------------------------------- the blocked, fused rewrite
@pytest.fixture(scope="module")
def before(import_benchmark):
    """The forms the blocked rewrite replaced, as ``benchmarks/k_wide_passes.py`` keeps them."""
    return import_benchmark("k_wide_passes")


def _crops(n_crops, n_views, batch=6, k=37, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = [(3 * torch.randn(batch, k, generator=gen)).to(dtype).requires_grad_() for _ in range(n_crops)]
    teacher = [torch.softmax(torch.randn(batch, k, generator=gen) / 0.04, dim=1) for _ in range(n_views)]
    return student, teacher


@pytest.mark.parametrize("n_crops,n_views", [(2, 2), (5, 2), (4, 3), (3, 1)])
def test_fused_loss_equals_the_pairwise_loss_in_value_and_gradient(row_block_elements, before, n_crops, n_views):
    student, teacher = _crops(n_crops, n_views)
    fused = dino_loss(student, teacher, 0.1)
    # with one teacher view, crop 0 (that view) is in no pair: no gradient in either form
    grads = torch.autograd.grad(fused, student, allow_unused=True, materialize_grads=True)
    reference_student = [s.detach().clone().requires_grad_() for s in student]
    reference = before.pairwise_loss_before(reference_student, teacher, 0.1)
    reference_grads = torch.autograd.grad(reference, reference_student, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(fused, reference)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want)


def test_fused_cross_entropy_passes_gradcheck_for_logits_and_targets(row_block_elements):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, q: softmax_cross_entropy_sum(s, q, 0.3), (logits, targets))


def test_fused_loss_under_bf16_autocast_errs_no_more_than_the_pairwise_loss(before):
    # bf16 logits, as an autocast forward of the prototype layer produces them
    student, teacher = _crops(4, 2, batch=16, k=300, dtype=torch.bfloat16)
    exact_student = [s.detach().double().requires_grad_() for s in student]
    exact = before.pairwise_loss_before(exact_student, [q.double() for q in teacher], 0.1)
    exact_grads = torch.autograd.grad(exact, exact_student)
    errors = {}
    for name, loss_fn in (("fused", dino_loss), ("pairwise", before.pairwise_loss_before)):
        inputs = [s.detach().clone().requires_grad_() for s in student]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(inputs, teacher, 0.1)
        grads = torch.autograd.grad(loss, inputs)
        assert loss.dtype == torch.float32
        errors[name] = (abs(float(loss.detach()) - float(exact.detach())),
                        max(float((g.double() - e).abs().max()) for g, e in zip(grads, exact_grads)))
    assert errors["fused"][0] <= errors["pairwise"][0] + 1e-6
    assert errors["fused"][1] <= errors["pairwise"][1] + 1e-6


def test_fused_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        softmax_cross_entropy_sum(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)


@pytest.mark.parametrize("with_center", [True, False])
def test_blocked_teacher_probabilities_equal_the_softmax(row_block_elements, with_center):
    gen = torch.Generator().manual_seed(2)
    t = 5 * torch.randn(7, 23, generator=gen)
    c = torch.randn(1, 23, generator=gen) if with_center else None
    expected = torch.softmax(((t - c) if with_center else t) / 0.04, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(teacher_probabilities(t, 0.04, c), expected)
    # bf16 logits give fp32 targets, from the same rounded values
    torch.testing.assert_close(teacher_probabilities(t.bfloat16(), 0.04, c),
                               torch.softmax(((t.bfloat16().float() - c) if with_center else t.bfloat16().float())
                                             / 0.04, dim=-1))


def test_teacher_probabilities_keep_their_gradient_when_the_logits_need_one():
    t = torch.randn(3, 5, requires_grad=True)
    q = teacher_probabilities(t, 0.5)
    assert q.requires_grad
    (q[:, 0].sum()).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_row_blocks_cover_every_row_once():
    blocks_ = row_blocks(10, 7, block_elements=20)
    assert [(b.start, b.stop) for b in blocks_] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert [(b.start, b.stop) for b in row_blocks(3, 100, block_elements=20)] == [(0, 1), (1, 2), (2, 3)]


def test_teacher_probabilities_leave_the_logits_unchanged():
    t = torch.randn(4, 9)
    before = t.clone()
    with torch.no_grad():
        teacher_probabilities(t, 0.1)
        teacher_probabilities(t, 0.1, torch.randn(1, 9))
    assert torch.equal(t, before)


@pytest.fixture(params=[False, True], ids=["denormals", "flushed"])
def flush_denormal(request):
    """Both settings of the CPU's denormal floats: the trainer flushes them to zero, and then the
    order of the multiplications decides which tiny masses vanish."""
    # the setting the suite had (the trainer turns flushing on, and later tests run faster with it)
    previous = float(torch.tensor([1e-40]) * 1.0) == 0.0
    torch.set_flush_denormal(request.param)
    yield request.param
    torch.set_flush_denormal(previous)


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
@pytest.mark.parametrize("row_shift", [True, False])
def test_blocked_sinkhorn_equals_the_previous_form(row_block_elements, before, flush_denormal, iterations, row_shift):
    from nocollapse.losses.sinkhorn import sinkhorn_knopp

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 31, generator=gen) * (0.3 if not row_shift else 3.0)
    expected = before.sinkhorn_before(logits, 0.05, iterations=iterations, row_shift=row_shift)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.05, iterations, row_shift=row_shift), expected)
    # bf16 scores give fp32 targets from the rounded values
    torch.testing.assert_close(sinkhorn_knopp(logits.bfloat16(), 0.05, iterations, row_shift=row_shift),
                               before.sinkhorn_before(logits.bfloat16().float(), 0.05, iterations=iterations,
                                                      row_shift=row_shift))


# --------------------------------------------------------------------------- the last layer inside the loss
@pytest.fixture(params=[None, (12, 5)], ids=["one-block", "column-blocks-of-5"])
def product_blocks(request, monkeypatch):
    """The fused node's backward pass at its default block size (the tests' K fit one block) and
    at blocks of 5 columns, with a ragged last block."""
    if request.param is not None:
        monkeypatch.setattr(dino_module, "PRODUCT_BLOCK_ELEMENTS", request.param[0])
        monkeypatch.setattr(dino_module, "PRODUCT_BLOCK_MIN_COLUMNS", request.param[1])
    return request.param


def _factors(n_crops, n_views, batch=6, k=37, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_crops * batch, dim, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(k, dim, generator=gen, dtype=dtype) / 2).requires_grad_()
    teacher = [torch.softmax(torch.randn(batch, k, generator=gen, dtype=dtype) / 0.04, dim=1) for _ in range(n_views)]
    return inputs, weight, teacher


def _layer_then_loss(inputs, weight, teacher, temperature):
    """Today's path: the layer's logits, then the loss on them."""
    logits = torch.nn.functional.linear(inputs, weight).float()
    return dino_loss(list(logits.split(teacher[0].shape[0])), teacher, temperature)


@pytest.mark.parametrize("n_crops,n_views", [(2, 2), (5, 2), (4, 3), (3, 1)])
def test_prototype_loss_equals_the_loss_of_the_layers_logits(product_blocks, n_crops, n_views):
    inputs, weight, teacher = _factors(n_crops, n_views)
    fused, logits = dino_prototype_loss(inputs, weight, teacher, 0.1)
    grads = torch.autograd.grad(fused, [inputs, weight])
    reference = _layer_then_loss(inputs, weight, teacher, 0.1)
    reference_grads = torch.autograd.grad(reference, [inputs, weight])
    torch.testing.assert_close(fused, reference)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want)
    assert len(logits) == n_crops
    for crop_logits, z in zip(logits, inputs.detach().split(6)):   # each crop's logits, without a gradient
        if crop_logits is not None:
            assert not crop_logits.requires_grad
            torch.testing.assert_close(crop_logits, z @ weight.detach().t())
    assert (logits[0] is None) == (n_views == 1)   # one view: crop 0 is in no pair


def test_prototype_loss_passes_gradcheck(product_blocks):
    inputs, weight, teacher = _factors(3, 2, batch=2, k=11, dim=4, seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, w: dino_prototype_loss(z, w, teacher, 0.3)[0], (inputs, weight))


def test_prototype_loss_leaves_rows_without_a_gradient_alone():
    inputs, weight, teacher = _factors(2, 2)
    frozen = weight.detach()                  # decoupled prototypes: no gradient to the means
    loss, _ = dino_prototype_loss(inputs, frozen, teacher, 0.1)
    loss.backward()
    assert inputs.grad is not None and frozen.grad is None


def test_prototype_loss_under_bf16_autocast_errs_no_more_than_the_layer_then_loss(product_blocks):
    inputs, weight, teacher = _factors(4, 2, batch=16, k=300, dim=32)
    errors = bf16_errors({"fused": lambda *a: dino_prototype_loss(*a)[0], "layer then loss": _layer_then_loss},
                         inputs, weight, (teacher, 0.1), ([q.double() for q in teacher], 0.1))
    assert errors["fused"][0] <= errors["layer then loss"][0] + 1e-6
    assert errors["fused"][1] <= errors["layer then loss"][1] + 1e-6


def test_prototype_loss_rejects_what_it_cannot_pair():
    inputs, weight, teacher = _factors(2, 2)
    with pytest.raises(ValueError, match=r"\[crops \* B, D\] and \[K, D\]"):
        dino_prototype_loss(inputs, weight[:, :3], teacher, 0.1)
    with pytest.raises(ValueError, match="whole crops of the teacher views' 6 rows"):
        dino_prototype_loss(inputs[:7], weight, teacher, 0.1)
    with pytest.raises(ValueError, match="no gradient: pass them detached"):
        dino_prototype_loss(inputs, weight, [q.clone().requires_grad_() for q in teacher], 0.1)
    with pytest.raises(ValueError, match="no crop pair"):
        dino_prototype_loss(inputs[:6], weight, teacher[:1], 0.1)
