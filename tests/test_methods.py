"""Methods: CARP loss by hand, decoupled prototypes isolated from gradients, learned-prototype
freezing, KoLeo, backbones with multi-crop."""

from __future__ import annotations

import math

import pytest
import torch
from precision_helpers import bf16_errors

from nocollapse.config import build_config
from nocollapse.utils.optim import build_optimizer
from nocollapse.losses.carp import (block_probabilities, block_softmax, carp_consistency, marginal_kl_to_uniform,
                                    to_prototype_order)
from nocollapse.prototypes.base import PrototypeSet
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.losses.koleo import koleo_loss


def test_block_probabilities_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])
    partition = torch.tensor([[1, 0], [2, 3]])
    p = block_probabilities(logits, partition)
    assert p.shape == (2, 1, 2)
    assert torch.allclose(p[0, 0], torch.tensor([0.75, 0.25]))
    assert torch.allclose(p[1, 0], torch.tensor([0.5, 0.5]))


def test_block_softmax_of_block_ordered_logits_is_the_block_probabilities_of_the_gathered_ones():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, generator=gen)
    partition = torch.randperm(12, generator=gen).view(3, 4)
    ordered = logits[:, partition.reshape(-1)]
    assert torch.equal(block_softmax(ordered, 4), block_probabilities(logits, partition))
    assert torch.equal(to_prototype_order(ordered, partition.reshape(-1)), logits)
    with pytest.raises(ValueError, match="block size 5 does not divide the 12 columns"):
        block_softmax(ordered, 5)


def test_carp_consistency_by_hand():
    # one block of 2, batch 1: p0 = [3/4, 1/4], p1 = [1/2, 1/2]; q0 = [1, 0], q1 = [0, 1]
    # pairs (i=0, j=1): -log 1/4 = log 4; (i=1, j=0): -log 1/2 = log 2 -> mean 1.5 log 2
    p = [torch.tensor([[[0.75, 0.25]]]), torch.tensor([[[0.5, 0.5]]])]
    q = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])]
    assert carp_consistency(p, q).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_carp_marginal_kl_by_hand():
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])   # [M=2, blocks=1, N_B=2]
    expected = math.log(2) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert marginal_kl_to_uniform(probs).item() == pytest.approx(expected, rel=1e-5)


def test_fully_collapsed_carp_scores_log_block_size():
    nb = 16
    uniform = [torch.full((3, 5, nb), 1 / nb) for _ in range(2)]
    assert carp_consistency(uniform, uniform).item() == pytest.approx(math.log(nb), rel=1e-6)
    assert marginal_kl_to_uniform(torch.cat(uniform, 1).transpose(0, 1)).item() == pytest.approx(0.0, abs=1e-6)


def _carp_scores(dtype=torch.float32, k=48, batch=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(2 * batch, k, generator=gen) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(2 * batch, k, generator=gen) * 3).to(dtype)
    return student, teacher, torch.randperm(k, generator=gen).view(-1, 8)


def test_carp_loss_equals_the_form_it_replaced(import_benchmark):
    """CARP's loss now (``index_select`` gather, block marginals from per-process row sums)
    against the form it replaced (advanced indexing, every row gathered into one tensor): fp32
    loss values and gradients equal."""
    passes = import_benchmark("k_wide_passes")
    grads, losses = [], []
    for loss_fn in (passes.carp_loss_before, passes.carp_loss):
        student, teacher, partition = _carp_scores()
        loss = loss_fn(student, teacher, partition, 5)
        loss.backward()
        losses.append(loss.detach())
        grads.append(student.grad)
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_carp_loss_under_bf16_autocast_errs_no_more_than_before(import_benchmark):
    passes = import_benchmark("k_wide_passes")
    student, teacher, partition = _carp_scores()
    exact = passes.carp_loss_before(student, teacher, partition, 5).item()
    errors = []
    for loss_fn in (passes.carp_loss_before, passes.carp_loss):
        low, low_teacher, _ = _carp_scores(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            errors.append(abs(loss_fn(low, low_teacher, partition, 5).item() - exact))
    assert errors[1] <= errors[0] * (1 + 1e-6) + 1e-7, errors


def test_koleo_by_hand():
    # two orthogonal unit prototypes: nearest-neighbour distance sqrt(2) -> -log sqrt(2)
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert koleo_loss(v).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)


TINY = ["data.image_size=8", "model.width_multiplier=0.125", "method.num_prototypes=32",
        "method.head.hidden_dim=32", "method.head.bottleneck_dim=8", "train.epochs=2"]


def _method(*overrides, image=8):
    cfg, _ = build_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, image)
    return cfg, build_method(cfg, backbone, steps_per_epoch=4)


def _crops(n=2, batch=6, size=8, local=0):
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n)]
    return crops + [torch.randn(batch, 3, size // 2, size // 2, generator=gen) for _ in range(local)]


@pytest.mark.parametrize("name", ["dino", "carp"])
def test_decoupled_prototypes_get_no_gradient_and_are_not_optimised(name):
    extra = ["carp.block_size=8"] if name == "carp" else []
    cfg, method = _method(f"method.name={name}", "method.prototypes=decoupled", *extra)
    assert not any("gmm" in n for n, _ in method.named_parameters())
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(b) not in optimised for b in method.gmm.buffers())
    before = method.gmm.means.clone()
    out = method(_crops(), step=0)
    out.loss.backward()
    assert all(not b.requires_grad and b.grad is None for b in method.gmm.buffers())
    assert method.student.backbone.conv1.weight.grad is not None       # the encoder does learn
    # the mixture moves by EM (seeded from the teacher embeddings), not by the optimiser: the EM
    # update is committed after the optimiser step, once the loss is known to be finite
    optimizer.step()
    assert torch.equal(before, method.gmm.means)
    method.on_after_optimizer_step(0)
    assert not torch.equal(before, method.gmm.means)


def test_learned_prototypes_are_frozen_during_the_first_epoch():
    cfg, method = _method("method.freeze_last_layer_epochs=1")
    out = method(_crops(), step=3)      # steps_per_epoch = 4 -> frozen for steps 0..3
    out.loss.backward()
    method.on_after_backward(3)
    assert all(p.grad is None for p in method.student_prototypes.parameters())
    method.zero_grad()
    out = method(_crops(), step=4)
    out.loss.backward()
    method.on_after_backward(4)
    assert method.student_prototypes.layer.parametrizations.weight.original1.grad is not None


def test_koleo_weight_adds_the_regulariser_to_the_loss():
    _, plain = _method()
    _, kp = _method("method.koleo_weight=0.5")
    a, b = plain(_crops(), 0), kp(_crops(), 0)
    assert b.logs["loss_koleo"] > 0
    assert b.loss.item() == pytest.approx(a.loss.item() + 0.5 * b.logs["loss_koleo"], rel=1e-5)


@pytest.mark.parametrize("name", ["dino", "carp"])
@pytest.mark.parametrize("prototypes", ["learned", "decoupled"])
def test_embedding_koleo_adds_koleo_of_each_global_crop_of_the_student_embeddings(name, prototypes):
    extra = [f"method.name={name}", f"method.prototypes={prototypes}"] + (["carp.block_size=8"] if name == "carp" else [])
    _, plain = _method(*extra)
    _, spread = _method(*extra, "method.embedding_koleo_weight=0.5")
    crops = _crops(n=2, batch=6, local=2 if name == "dino" else 0)
    a, b = plain(crops, 0), spread(crops, 0)
    with torch.no_grad():   # the same student (same seed): the KoLeo of crop 1 and crop 2, local crops left out
        _, emb = spread.student(crops)
    by_hand = 0.5 * (koleo_loss(emb[:6]) + koleo_loss(emb[6:12])).item()
    assert b.logs["loss_embedding_koleo"] == pytest.approx(by_hand, rel=1e-5)
    assert b.loss.item() == pytest.approx(a.loss.item() + 0.5 * by_hand, rel=1e-5)
    b.loss.backward()    # the term reaches the encoder
    assert all(p.grad is not None for p in spread.student.projector.parameters() if p.requires_grad)


def test_embedding_koleo_pushes_clumped_embeddings_apart():
    # two tight clumps of three: the nearest neighbour of every row is inside its clump, so one
    # gradient step on the KoLeo term must raise every nearest-neighbour distance
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = (base.repeat_interleave(3, 0) + 0.01 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))
    x.requires_grad_(True)

    def nearest_distances(v):
        u = torch.nn.functional.normalize(v, dim=1)
        d = torch.cdist(u, u) + 10 * torch.eye(len(u))
        return d.min(1).values

    before = nearest_distances(x.detach())
    koleo_loss(x).backward()
    after = nearest_distances((x - 1e-3 * x.grad).detach())
    assert torch.all(after > before)


def test_dino_centering_is_on_by_default_and_can_be_dropped():
    _, learned = _method()
    _, decoupled = _method("method.prototypes=decoupled")
    assert learned.centering and decoupled.centering
    _, dropped = _method("method.prototypes=decoupled", "dino.teacher_norm=none")
    assert not dropped.centering
    before = dropped.center.clone()
    dropped(_crops(), 0)
    assert torch.equal(dropped.center, before)      # no centre update without centering


def test_carp_partition_is_a_seeded_permutation_per_step():
    _, carp = _method("method.name=carp", "carp.block_size=8")
    a, b, c = carp.partition(5, torch.device("cpu")), carp.partition(5, torch.device("cpu")), carp.partition(6, torch.device("cpu"))
    assert a.shape == (4, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.flatten().tolist()) == list(range(32))


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_multicrop_forward_with_resnet_and_vit(backbone):
    cfg, method = _method(f"model.backbone={backbone}", "model.patch_size=2", image=8)
    out = method(_crops(local=3), step=0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert out.teacher_probs.shape == (6, 32)


@pytest.mark.parametrize("name", ["dino", "carp"])
def test_decoupled_methods_hold_the_public_module(name):
    from nocollapse import DecoupledPrototypes

    extra = ["carp.block_size=8"] if name == "carp" else []
    _, method = _method(f"method.name={name}", "method.prototypes=decoupled", *extra)
    assert type(method.gmm) is DecoupledPrototypes
    z = torch.nn.functional.normalize(torch.randn(3, method.embedding_dim), dim=1)
    assert torch.equal(method.student_scores(z), method.gmm(z))
    assert torch.equal(method.teacher_scores(z), method.gmm(z))


@pytest.mark.parametrize("name", ["dino", "carp"])
def test_decoupled_targets_and_student_scores_use_the_same_means(name):
    """The student is scored against the means its targets came from; the EM update of the step is
    written only after the optimiser step."""
    extra = ["carp.block_size=8"] if name == "carp" else []
    _, method = _method(f"method.name={name}", "method.prototypes=decoupled", *extra)
    method(_crops(batch=16), step=0)           # 2 x 16 embeddings seed all 32 components
    method.on_after_optimizer_step(0)
    before = method.gmm.means.clone()
    seen = []
    original, original_factors = method.student_scores, method.gmm.product_factors
    # CARP scores by student_scores; DINO hands the loss the set's product factors
    method.student_scores = lambda z, *order: (seen.append(method.gmm.step_means.clone()), original(z, *order))[1]
    method.gmm.product_factors = lambda z: (seen.append(method.gmm.step_means.clone()), original_factors(z))[1]
    method(_crops(batch=16), step=1)
    assert seen and all(torch.equal(m, before) for m in seen)
    assert torch.equal(method.gmm.means, before)
    method.on_after_optimizer_step(1)
    assert not torch.equal(method.gmm.means, before)


def test_a_skipped_step_changes_neither_the_mixture_nor_the_centre():
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.methods.dino import DINO

    cfg, method = _method("method.prototypes=decoupled")
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    optimisation_step(method, method, optimizer, _crops(), 0, 1e-3, 0.0)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    original = DINO.training_step

    def nan_loss(self, batch, step):
        out = original(self, batch, step)
        out.loss = out.loss * float("nan")
        return out

    DINO.training_step = nan_loss
    try:
        loss, out = optimisation_step(method, method, optimizer, _crops(), 1, 1e-3, 0.0)
    finally:
        DINO.training_step = original
    assert out is None and not torch.isfinite(loss)
    assert not method.gmm.pending        # the proposal of the skipped step is dropped
    for key, value in method.state_dict().items():
        if key.startswith("gmm.") or key == "center":
            assert torch.equal(value, state[key]), key
    # the next good step starts from the state before the skipped one
    optimisation_step(method, method, optimizer, _crops(), 2, 1e-3, 0.0)
    assert int(method.gmm.num_updates) == int(state["gmm.num_updates"]) + 1
    assert not torch.equal(method.center, state["center"])


def test_buffer_seeding_runs_after_the_warm_up():
    cfg, method = _method("method.prototypes=decoupled", "gmm.buffer_factor=2", "gmm.seed_after_epochs=0.75",
                          "gmm.refresh_every_epochs=0.25")
    assert method.gmm.seed_after_steps == 3 and method.gmm.refresh_every_steps == 1
    for step in range(5):
        method(_crops(batch=16), step=step)
        method.on_after_optimizer_step(step)
        assert int(method.gmm.num_buffer_seedings) == (0 if step < 2 else step - 1)
    assert method.gmm.buffer.shape == (64, 8)


def test_dino_student_probabilities_are_computed_when_read_and_are_the_second_views_softmax():
    cfg, method = _method("method.prototypes=learned")
    crops = _crops()
    out = method(crops, 0)
    assert callable(out.student_probs)
    probs = out.student_probs()
    with torch.no_grad():
        _, embeddings = method.student(crops)
        logits = method.student_scores(embeddings).float()
    expected = torch.softmax(logits[6:12] / cfg.dino.student_temp, dim=-1)
    torch.testing.assert_close(probs, expected)
    assert not probs.requires_grad


def _prototype_overrides(prototypes):
    """The overrides of a parametrised prototype variant: learned, or decoupled with its targets
    (``decoupled``, ``decoupled_sinkhorn``, ``decoupled_posterior``)."""
    extra = [] if prototypes == "learned" else ["method.prototypes=decoupled"]
    if prototypes == "decoupled_sinkhorn":
        extra += ["dino.teacher_norm=sinkhorn"]
    if prototypes == "decoupled_posterior":
        extra += ["gmm.targets=posterior"]
    return extra


def _second_step(extra, crops, change=None):
    """The method of ``extra`` (``change(method)`` applied first) after a first step on ``crops``
    and its commit (which seeds a mixture), then step 3 with its loss's gradients:
    ``(method, output, gradients by parameter name)``."""
    _, method = _method(*extra)
    if change is not None:
        change(method)
    method(crops, step=0)
    method.on_after_optimizer_step(0)
    method.zero_grad()
    out = method(crops, step=3)
    out.loss.backward()
    return method, out, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _assert_same_step(new, new_grads, old, old_grads):
    """Two forms of one step agree: the loss, every gradient and the monitor's probabilities."""
    torch.testing.assert_close(new.loss, old.loss)
    assert new_grads.keys() == old_grads.keys() and new_grads
    for name in new_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], msg=name)
    torch.testing.assert_close(new.teacher_probs, old.teacher_probs)
    torch.testing.assert_close(new.student_probs(), old.student_probs())


def _without_product_factors(method):
    """The layer-then-loss form: the set offers the loss no product factors."""
    method.prototype_set().product_factors = lambda z: None


def _gathering_scores(prototypes):
    """Make ``prototypes`` score in prototype order and gather the columns afterwards, as CARP
    did before it scored against the rows taken in block order (the base class's fallback)."""
    prototypes.ordered_scores = PrototypeSet.ordered_scores.__get__(prototypes)
    prototypes.ordered_target_scores = PrototypeSet.ordered_target_scores.__get__(prototypes)


@pytest.mark.parametrize("prototypes", ["learned", "decoupled", "decoupled_posterior"])
def test_carp_scores_against_rows_in_block_order_as_it_did_against_gathered_scores(prototypes):
    """CARP takes the prototype rows in the partition's order before the product instead of
    gathering the [N, K] scores into their blocks: the loss, every gradient and the monitor's
    probabilities (back in prototype order) are those of the gathering form."""
    extra = ["method.name=carp", "carp.block_size=8", "model.width_multiplier=0.25", *_prototype_overrides(prototypes)]
    crops = _crops(batch=16)
    _, new, new_grads = _second_step(extra, crops)
    method, old, old_grads = _second_step(extra, crops, lambda m: _gathering_scores(m.prototype_set()))
    _assert_same_step(new, new_grads, old, old_grads)
    with torch.no_grad():     # the monitor's probabilities are in prototype order
        _, t_emb = method.teacher(crops[:2])
        _, s_emb = method.student(crops)
        torch.testing.assert_close(new.teacher_probs, torch.softmax(method.teacher_scores(t_emb[:16].float()), -1))
        torch.testing.assert_close(new.student_probs(), torch.softmax(method.student_scores(s_emb[16:32]), -1))
    assert new.logs.keys() == old.logs.keys()
    for key in new.logs:
        assert new.logs[key] == pytest.approx(old.logs[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("kind", ["learned", "decoupled"])
def test_ordered_scores_are_the_scores_with_their_columns_in_that_order(kind):
    extra = ["method.prototypes=decoupled"] if kind == "decoupled" else []
    _, method = _method("method.name=carp", "carp.block_size=8", *extra)
    prototypes = method.prototype_set()
    if kind == "decoupled":
        method(_crops(batch=16), step=0)
        method.on_after_optimizer_step(0)
    order = torch.randperm(prototypes.num_prototypes, generator=torch.Generator().manual_seed(3))
    z = torch.randn(4, method.embedding_dim, requires_grad=True)
    ordered = prototypes.ordered_scores(z, order)
    torch.testing.assert_close(ordered, prototypes(z)[:, order])
    torch.testing.assert_close(prototypes.ordered_target_scores(z, order), prototypes.target_scores(z)[:, order])
    weights = torch.randn_like(ordered)
    (ordered * weights).sum().backward()
    trained = [p for p in prototypes.parameters() if p.requires_grad]
    by_order = [z.grad.clone()] + [p.grad.clone() for p in trained]
    z.grad = None
    for p in trained:
        p.grad = None
    (prototypes(z)[:, order] * weights).sum().backward()
    for a, b in zip(by_order, [z.grad] + [p.grad for p in trained]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prototypes", ["learned", "decoupled", "decoupled_sinkhorn", "decoupled_posterior"])
def test_dino_makes_the_student_logits_inside_the_loss_as_the_layer_made_them(prototypes):
    """DINO hands the loss the student's embeddings and the prototype rows, so that the logits'
    gradient is never whole: loss, every gradient, the centre and the monitor's probabilities are
    those of the layer-then-loss form (the set's ``product_factors`` turned off)."""
    extra = ["model.width_multiplier=0.25", *_prototype_overrides(prototypes)]
    crops = _crops(batch=16, local=2)
    fused, new, new_grads = _second_step(extra, crops)
    unfused, old, old_grads = _second_step(extra, crops, _without_product_factors)
    _assert_same_step(new, new_grads, old, old_grads)
    assert any("prototypes" in n for n in new_grads) == (prototypes == "learned")
    new_center, old_center = fused._pending_center, unfused._pending_center
    if new_center is not None or old_center is not None:
        torch.testing.assert_close(new_center, old_center)


@pytest.mark.parametrize("prototypes", ["learned", "decoupled", "decoupled_posterior"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
def test_carp_makes_the_student_scores_inside_the_loss_as_the_unfused_loss_did(prototypes, weights):
    """CARP hands its loss the student's rows and the prototype rows in block order: loss, both
    terms, every gradient and the monitor's probabilities are those of the unfused form (the set's
    ``product_factors`` turned off), with two local crops."""
    extra = ["method.name=carp", "carp.block_size=8", "model.width_multiplier=0.25",
             f"carp.consistency_weight={weights[0]}", f"carp.entropy_weight={weights[1]}",
             *_prototype_overrides(prototypes)]
    crops = _crops(batch=16, local=2)
    _, new, new_grads = _second_step(extra, crops)
    _, old, old_grads = _second_step(extra, crops, _without_product_factors)
    _assert_same_step(new, new_grads, old, old_grads)
    for key in ("loss_consistency", "loss_marginal_kl"):
        assert new.logs[key] == pytest.approx(old.logs[key], rel=1e-5, abs=1e-7), key


def _carp_unfused(inputs, rows, teacher, batch, block_size, weights=(1.0, 1.0)):
    """The unfused form: the layer's scores, block softmaxes, pairwise consistency and the KL of
    the marginal over student and teacher rows (one process)."""
    from nocollapse.losses.carp import block_kl_to_uniform

    s_probs = block_softmax(torch.nn.functional.linear(inputs, rows), block_size)
    t_probs = block_softmax(teacher.log(), block_size)      # the teacher's block probabilities again
    consistency = carp_consistency(list(s_probs.split(batch, dim=1)), list(t_probs.split(batch, dim=1)))
    marginal = (s_probs.sum(1) + t_probs.sum(1)) / (s_probs.shape[1] + t_probs.shape[1])
    return weights[0] * consistency + weights[1] * block_kl_to_uniform(marginal)


def _carp_factors(crops=4, views=2, batch=5, k=48, dim=6, block_size=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(crops * batch, dim, generator=gen, dtype=dtype).requires_grad_()
    rows = torch.randn(k, dim, generator=gen, dtype=dtype).requires_grad_()
    logits = torch.randn(views * batch, k // block_size, block_size, generator=gen, dtype=dtype) / 0.3
    teacher = torch.softmax(logits, dim=-1).reshape(views * batch, k)
    return inputs, rows, teacher


@pytest.fixture(params=[None, 60], ids=["one-chunk", "chunks-of-one-block"])
def carp_chunks(request, monkeypatch):
    from nocollapse.losses import carp as carp_module

    if request.param is not None:
        monkeypatch.setattr(carp_module, "CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("crops,views", [(2, 2), (4, 2), (3, 1)])
def test_carp_prototype_loss_equals_the_unfused_loss(carp_chunks, crops, views):
    from nocollapse.losses.carp import carp_prototype_loss

    inputs, rows, teacher = _carp_factors(crops, views)
    loss, consistency, kl, scores = carp_prototype_loss(inputs, rows, teacher, 5, 8, 0.7, 1.3)
    grads = torch.autograd.grad(loss, [inputs, rows])
    reference = _carp_unfused(inputs, rows, teacher, 5, 8, (0.7, 1.3))
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(0.7 * consistency + 1.3 * kl, reference)
    for got, want in zip(grads, torch.autograd.grad(reference, [inputs, rows])):
        torch.testing.assert_close(got, want)
    assert not scores.requires_grad
    torch.testing.assert_close(scores, inputs.detach() @ rows.detach().t())


def test_carp_prototype_loss_passes_gradcheck(carp_chunks):
    from nocollapse.losses.carp import carp_prototype_loss

    inputs, rows, teacher = _carp_factors(crops=3, views=2, batch=2, k=16, dim=3, block_size=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, w: carp_prototype_loss(z, w, teacher, 2, 4, 0.7, 1.3)[0],
                                    (inputs, rows))


def test_carp_prototype_loss_under_bf16_autocast_errs_no_more_than_the_unfused_loss():
    from nocollapse.losses.carp import carp_prototype_loss

    inputs, rows, teacher = _carp_factors(crops=4, views=2, batch=16, k=256, dim=32, block_size=16)
    errors = bf16_errors({"fused": lambda *a: carp_prototype_loss(*a)[0], "unfused": _carp_unfused},
                         inputs, rows, (teacher, 16, 16), (teacher.double(), 16, 16))
    assert errors["fused"][0] <= errors["unfused"][0] + 1e-6
    assert errors["fused"][1] <= errors["unfused"][1] + 1e-6


def test_carp_prototype_loss_rejects_what_it_cannot_pair():
    from nocollapse.losses.carp import carp_prototype_loss

    inputs, rows, teacher = _carp_factors()
    with pytest.raises(ValueError, match="block size 7 does not divide the 48 prototypes"):
        carp_prototype_loss(inputs, rows, teacher, 5, 7)
    with pytest.raises(ValueError, match="whole crops of 6 rows"):
        carp_prototype_loss(inputs, rows, teacher, 6, 8)
    with pytest.raises(ValueError, match=r"\[rows, D\] and \[K, D\]"):
        carp_prototype_loss(inputs, rows[:, :3], teacher, 5, 8)
    with pytest.raises(ValueError, match="at least one student crop / teacher view pair"):
        carp_prototype_loss(inputs[:5], rows, teacher[:5], 5, 8)
