"""LARS: the layer-wise trust ratio, with and without the clip mode of solo-learn's CIFAR recipes."""

from __future__ import annotations

import pytest
import torch

from nocollapse.utils.optim import LARS


def one_step(weight: torch.Tensor, grad: torch.Tensor, **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(weight.clone())
    p.grad = grad.clone()
    LARS([p], **kwargs).step()
    return p.detach()


def larc_reference(weight, grad, lr, eta, weight_decay, clip):
    """apex LARC / solo-learn's LARS written out for one step from a zero momentum buffer: the
    adaptive rate eta ||w|| / ||g + wd w|| (this package puts the weight decay inside the norm),
    clipped to min(rate / lr, 1) in clip mode, multiplies the decayed gradient before the SGD step."""
    d = grad + weight_decay * weight
    rate = eta * weight.norm() / d.norm()
    if clip:
        rate = min(rate / lr, 1.0)
    return weight - lr * rate * d


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])          # trust ratio above lr / below lr
def test_one_step_equals_the_written_out_rule(clip, grad_scale):
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(30, 8, generator=g), grad_scale * torch.randn(30, 8, generator=g)
    got = one_step(w, grad, lr=0.6, eta=0.02, weight_decay=1e-4, clip_lr=clip)
    torch.testing.assert_close(got, larc_reference(w, grad, 0.6, 0.02, 1e-4, clip))


def test_clip_caps_the_layer_rate_at_lr_and_otherwise_uses_the_trust_ratio_itself():
    w = torch.eye(4)                                  # ||w|| = 2
    small = torch.full((4, 4), 0.001)                 # ||d|| = 0.004: trust ratio 0.02 * 2 / 0.004 = 10
    moved = w - one_step(w, small, lr=0.5, eta=0.02, clip_lr=True)
    torch.testing.assert_close(moved, 0.5 * small)    # capped: plain SGD at lr
    moved = w - one_step(w, small, lr=0.5, eta=0.02, clip_lr=False)
    torch.testing.assert_close(moved, 0.5 * 10 * small)   # lr x ratio: 10 times the SGD step
    large = torch.full((4, 4), 1.0)                   # ||d|| = 4: trust ratio 0.01 < lr
    moved = w - one_step(w, large, lr=0.5, eta=0.02, clip_lr=True)
    torch.testing.assert_close(moved, 0.01 * large)   # the layer's rate is the ratio itself


def test_biases_and_norm_gains_take_plain_sgd_steps():
    b = torch.ones(5)
    grad = torch.full((5,), 0.1)
    for clip in (False, True):
        torch.testing.assert_close(b - one_step(b, grad, lr=0.3, eta=0.02, clip_lr=clip), 0.3 * grad)
