"""The device paths: every method's step under bf16 autocast on the accelerator when one is present
(CUDA), on the CPU otherwise, and the numerically delicate parts (the mixture's E-step, the
Sinkhorn codes, the cross-correlation, fixed-prototype scores) kept in fp32 whatever the caller's
autocast.

These tests carry the ``cuda`` mark: ``benchmarks/gpu_check.py`` runs them on a CUDA machine
(``pytest -m cuda``), where ``DEVICE`` is the GPU; in the everyday suite they run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nocollapse.config import build_config
from nocollapse.data.batch import Batch
from nocollapse.engine.trainer import optimisation_step
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone
from nocollapse.utils.optim import build_optimizer
from nocollapse.utils.registry import METHODS

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, SIZE, LOCAL = 8, 16, 8

PROTOTYPE_HEAD = ["method.num_prototypes=32", "method.head.hidden_dim=32", "method.head.bottleneck_dim=16"]
CONTRASTIVE_HEAD = ["contrastive.hidden_dim=32", "contrastive.output_dim=16"]
CASES = {
    "dino": ["method.name=dino", "method.prototypes=learned", "views.local_crops=2", *PROTOTYPE_HEAD],
    "dino_decoupled": ["method.name=dino", "method.prototypes=decoupled", "dino.teacher_norm=sinkhorn",
                       "views.local_crops=2", *PROTOTYPE_HEAD],
    "carp": ["method.name=carp", "carp.block_size=8", "views.local_crops=2", *PROTOTYPE_HEAD],
    "carp_decoupled": ["method.name=carp", "carp.block_size=8", "method.prototypes=decoupled", *PROTOTYPE_HEAD],
    "swav": ["method.name=swav", "method.prototypes=learned", "views.local_crops=2", "swav.queue_length=16",
             "swav.queue_start_epochs=0", *PROTOTYPE_HEAD],
    "swav_decoupled": ["method.name=swav", "method.prototypes=decoupled", *PROTOTYPE_HEAD],
    "cplearn": ["method.name=cplearn", "cplearn.embedding_dim=16", "cplearn.num_codes=32"],
    "simclr": ["method.name=simclr", *CONTRASTIVE_HEAD],
    "supcon": ["method.name=supcon", "data.label_fraction=0.5", *CONTRASTIVE_HEAD],
    "clop": ["method.name=clop", "data.label_fraction=0.5", *CONTRASTIVE_HEAD],
    "barlow_twins": ["method.name=barlow_twins", "barlow_twins.hidden_dim=32", "barlow_twins.output_dim=16"],
    "vicreg": ["method.name=vicreg", "vicreg.hidden_dim=32", "vicreg.output_dim=16"],
    "byol": ["method.name=byol", "byol.hidden_dim=32", "byol.output_dim=16", "byol.predictor_hidden_dim=16"],
    "simsiam": ["method.name=simsiam", "simsiam.hidden_dim=32", "simsiam.output_dim=16",
                "simsiam.predictor_hidden_dim=8"],
}


def _method(overrides: list[str]):
    cfg, _ = build_config(overrides=["model.width_multiplier=0.125", f"train.batch_size={BATCH}", "train.epochs=1",
                                     *overrides])
    METHODS.get(cfg.method.name).configure_for_data(cfg, 10)
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, SIZE), steps_per_epoch=4).to(DEVICE)
    return cfg, method


def _batch(cfg, method, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    crops = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    crops += [torch.randn(BATCH, 3, LOCAL, LOCAL, generator=gen) for _ in range(cfg.views.local_crops)]
    labels = torch.randint(-1, 10, (BATCH,), generator=gen) if method.uses_labels else None
    return Batch(crops, labels, torch.arange(BATCH)).to(DEVICE)


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_steps_under_bf16_autocast_on_the_device(case):
    cfg, method = _method(CASES[case])
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    before = {k: v.detach().clone() for k, v in method.named_parameters() if v.requires_grad}
    for step in range(3):
        loss, out = optimisation_step(method, method, optimizer, _batch(cfg, method, step), step, 0.01, 0.0,
                                      clip_grad=cfg.optim.clip_grad, amp_dtype=torch.bfloat16)
        assert out is not None and torch.isfinite(loss), (case, step)
        assert loss.dtype == torch.float32, case            # every loss is computed in fp32
        assert out.embeddings is None or bool(torch.isfinite(out.embeddings.float()).all()), case
    moved = [k for k, v in method.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert moved, case
    assert all(p.device.type == DEVICE.type for p in method.parameters())


def test_the_mixture_update_under_bf16_autocast_equals_fp32_on_the_device():
    from nocollapse.prototypes import DecoupledPrototypes

    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 32, generator=gen), dim=1)
    batches = [F.normalize(centres[torch.randint(0, 6, (64,), generator=gen)]
                           + 0.05 * torch.randn(64, 32, generator=gen), dim=1).to(DEVICE) for _ in range(20)]
    ref = DecoupledPrototypes(6, 32, eta=0.5, var_floor=1e-4).to(DEVICE)
    amp = DecoupledPrototypes(6, 32, eta=0.5, var_floor=1e-4).to(DEVICE)
    for step, x in enumerate(batches):
        g_ref = ref.update(x, step)
        ref.commit()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            g_amp = amp.update(x, step)
            scores = amp(x.bfloat16())
        amp.commit()
        assert g_amp.dtype == torch.float32 and torch.allclose(g_amp, g_ref, atol=1e-5)
        assert scores.shape == (64, 6)
    for name, value in ref.state_dict().items():
        assert torch.allclose(amp.state_dict()[name].float(), value.float(), atol=1e-5), name


def test_codes_and_correlations_stay_fp32_under_bf16_autocast_on_the_device():
    from nocollapse.losses.barlow_twins import cross_correlation
    from nocollapse.losses.swav import swav_codes
    from nocollapse.prototypes import FixedPrototypes, rademacher_codebook

    gen = torch.Generator().manual_seed(1)
    scores = F.normalize(torch.randn(32, 16, generator=gen), dim=1).to(DEVICE)
    z_a, z_b = torch.randn(32, 8, generator=gen).to(DEVICE), torch.randn(32, 8, generator=gen).to(DEVICE)
    codes = FixedPrototypes(rademacher_codebook(64, 128, seed=0).t(), temperature=0.5).to(DEVICE)
    h = torch.tanh(torch.randn(4, 64, generator=gen)).to(DEVICE)
    exact = (swav_codes(scores, 0.05), cross_correlation(z_a, z_b), codes(h))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        low = (swav_codes(scores.bfloat16(), 0.05), cross_correlation(z_a.bfloat16(), z_b.bfloat16()),
               codes(h.bfloat16()))
    for e, value in zip(exact, low):
        assert value.dtype == torch.float32
    # inputs rounded to bf16, arithmetic in fp32: errors of the rounding only
    assert torch.allclose(low[0], exact[0], atol=0.05)
    assert torch.allclose(low[1], exact[1], atol=0.02)
    assert torch.allclose(low[2], (h.bfloat16().float() @ codes.vectors().t()) / 0.5, atol=1e-4)
