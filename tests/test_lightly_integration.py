"""nocollapse.integrations.lightly against lightly's own modules (the ``lightly`` extra).

Each helper must give what lightly's loss uses inside: the losses are recomputed from the
helpers' outputs by the published formulas and compared with lightly's value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightly", reason="needs the lightly extra: pip install 'nocollapse[lightly]'")

from lightly.loss import DINOLoss, SwaVLoss  # noqa: E402
from lightly.models.modules import DINOProjectionHead, SwaVPrototypes  # noqa: E402

from nocollapse import CollapseMonitor, DecoupledPrototypes  # noqa: E402
from nocollapse.integrations.lightly import (  # noqa: E402
    DINOHeadWithBottleneck,
    dino_teacher_probabilities,
    dino_teacher_temperature,
    last_layer_directions,
    swav_codes,
    swav_prototype_vectors,
)


def scores(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dino_cross_entropy(teacher_probs, student_views, student_temp):
    """DINO's loss from the teacher targets: the mean over pairs of different views of
    ``-sum_k p_t log softmax(s / tau_s)``."""
    total, terms = 0.0, 0
    for t, p in enumerate(teacher_probs):
        for s, out in enumerate(student_views):
            if s == t:
                continue
            total = total + (-(p * F.log_softmax(out / student_temp, dim=-1)).sum(-1).mean())
            terms += 1
    return total / terms


@pytest.mark.parametrize("epoch", [0, 2, 10])
def test_teacher_probabilities_are_the_targets_of_dinoloss(epoch):
    criterion = DINOLoss(output_dim=16, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=5)
    criterion.center.copy_(0.3 * scores(1, 16, seed=9))          # a centre that has moved
    teacher = [scores(8, 16, seed=1), scores(8, 16, seed=2)]
    student = [scores(8, 16, seed=3), scores(8, 16, seed=4)]
    probs = dino_teacher_probabilities(criterion, teacher, epoch=epoch)     # before the loss
    assert probs.shape == (16, 16) and torch.allclose(probs.sum(-1), torch.ones(16))
    expected = dino_cross_entropy(probs.view(2, 8, 16), student, criterion.student_temp)
    center_before = criterion.center.clone()
    loss = criterion(teacher, student, epoch=epoch)
    assert torch.allclose(loss, expected, atol=1e-6)
    # after the call the centre has moved: probabilities read now would not be the targets
    assert not torch.equal(criterion.center, center_before)
    assert not torch.allclose(dino_teacher_probabilities(criterion, teacher, epoch=epoch), probs)


def test_teacher_temperature_follows_the_warm_up_and_an_explicit_value():
    criterion = DINOLoss(output_dim=4, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=5)
    assert dino_teacher_temperature(criterion, 0) == pytest.approx(0.02)
    assert dino_teacher_temperature(criterion, 4) == pytest.approx(float(criterion.teacher_temp_schedule[4]))
    assert dino_teacher_temperature(criterion, 7) == pytest.approx(0.06)
    assert dino_teacher_temperature(criterion, None) == pytest.approx(0.06)
    assert dino_teacher_temperature(criterion, 0, teacher_temp=0.5) == 0.5
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        dino_teacher_probabilities(criterion, scores(3, 5))


def test_the_head_wrapper_returns_the_heads_scores_and_its_bottleneck():
    torch.manual_seed(0)
    head = DINOProjectionHead(12, 32, 8, output_dim=20)
    wrapped = DINOHeadWithBottleneck(head)
    x = scores(6, 12)
    out, z = wrapped(x)
    assert torch.allclose(out, head(x), atol=1e-6)
    assert torch.allclose(z.norm(dim=-1), torch.ones(6)) and z.shape == (6, 8)
    protos = wrapped.prototypes
    assert protos.shape == (20, 8) and torch.allclose(protos.norm(dim=1), torch.ones(20))
    # the scores are the bottleneck against the unit prototype rows (lightly's norm-fixed last layer)
    assert torch.allclose(out, z @ protos.t(), atol=1e-5)
    with pytest.raises(TypeError, match="DINOProjectionHead"):
        DINOHeadWithBottleneck(torch.nn.Linear(3, 3))


def test_the_head_wrapper_with_decoupled_prototypes_drops_the_last_layer():
    head = DINOProjectionHead(12, 32, 8, output_dim=20)
    mixture = DecoupledPrototypes(20, 8)
    wrapped = DINOHeadWithBottleneck(head, prototypes=mixture)
    assert not hasattr(head, "last_layer") and wrapped.prototypes is mixture
    x = scores(40, 12)
    z = wrapped.bottleneck(x).detach()
    mixture.update(z, step=0)
    out, z2 = wrapped(x)
    assert out.shape == (40, 20) and torch.allclose(z2, z)
    mixture.commit()
    monitor = CollapseMonitor(num_prototypes=20, embedding_dim=8, tensorboard=False)
    assert "unique_0.1" in monitor.end_epoch(0, prototypes=wrapped.prototypes)


def test_last_layer_directions_read_both_weight_norm_styles():
    plain = torch.nn.Linear(5, 7, bias=False)
    old = torch.nn.utils.weight_norm(torch.nn.Linear(5, 7, bias=False))
    new = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(5, 7, bias=False))
    for layer, raw in ((plain, plain.weight), (old, old.weight_v), (new, new.parametrizations.weight.original1)):
        assert torch.allclose(last_layer_directions(layer), F.normalize(raw.detach(), dim=1))


def test_swav_codes_are_the_targets_of_swavloss():
    criterion = SwaVLoss(sinkhorn_epsilon=0.05)
    high = [scores(16, 10, seed=s) for s in (1, 2)]
    low = [scores(16, 10, seed=s) for s in (3, 4)]
    codes = [swav_codes(criterion, h) for h in high]
    assert torch.allclose(codes[0].sum(1), torch.ones(16), atol=1e-5)
    assert not torch.allclose(codes[0], F.softmax(high[0] / 0.05, 1), atol=1e-2)   # balanced, not a softmax
    views = high + low
    expected = 0.0
    for i, q in enumerate(codes):
        sub = sum(-(q * F.log_softmax(views[v] / criterion.temperature, 1)).sum(1).mean()
                  for v in range(len(views)) if v != i)
        expected = expected + sub / (len(views) - 1)
    expected = expected / len(high)
    assert torch.allclose(criterion(high, low), expected, atol=1e-5)
    # with a queue, the codes are the batch's rows of the codes of batch + queue
    queue = scores(32, 10, seed=7)
    with_queue = swav_codes(criterion, high[0], queue)
    assert with_queue.shape == (16, 10) and not torch.allclose(with_queue, codes[0])


def test_swav_prototype_vectors_are_unit_rows():
    single = SwaVPrototypes(8, 12)
    rows = swav_prototype_vectors(single)
    assert rows.shape == (12, 8) and torch.allclose(rows.norm(dim=1), torch.ones(12))
    multi = SwaVPrototypes(8, [12, 6])
    assert [r.shape for r in swav_prototype_vectors(multi)] == [(12, 8), (6, 8)]
