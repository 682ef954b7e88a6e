"""Refactors keep training what it was: every bundled recipe gives the recorded losses for its first
steps at a fixed seed.

Each recipe in ``fixtures/recipe_losses.json`` is built as its file says, with three changes that
keep the check to seconds: a ResNet-18 at 1/8 width, a batch of 8 random crops of the recipe's
sizes, and 2 steps per epoch (so that schedules counted in epochs, such as the frozen last layer
and the mixture's annealing, move within the 4 recorded steps). The losses were recorded before
the prototype code became one interface (learned, decoupled, fixed); a change that alters what a
recipe trains fails here.

Re-record (only when a change of the losses is intended, and say so in the commit)::

    python tests/test_recipe_regression.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "recipe_losses.json"
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "src" / "nocollapse" / "configs"
SHRINK = ["data.root=/nonexistent", "model.width_multiplier=0.125", "train.batch_size=8", "train.threads=1"]
BATCH, STEPS, STEPS_PER_EPOCH, CLASSES = 8, 4, 2, 10


def recipe_losses(recipe: str) -> list[float]:
    from nocollapse.config import build_config
    from nocollapse.data.batch import Batch
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone
    from nocollapse.utils.optim import build_optimizer
    from nocollapse.utils.registry import METHODS

    cfg, _ = build_config(CONFIG_ROOT / f"{recipe}.yaml", SHRINK)
    METHODS.get(cfg.method.name).configure_for_data(cfg, CLASSES)
    global_size = cfg.views.global_size or cfg.data.image_size or 32
    local_size = cfg.views.local_size or max(4, round(0.45 * global_size))
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, global_size), STEPS_PER_EPOCH)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        crops = [torch.randn(BATCH, 3, global_size, global_size, generator=gen) for _ in range(2)]
        crops += [torch.randn(BATCH, 3, local_size, local_size, generator=gen) for _ in range(cfg.views.local_crops)]
        labels = torch.randint(-1, CLASSES, (BATCH,), generator=gen)
        batch = Batch(crops, labels if method.uses_labels else None, torch.arange(BATCH))
        loss, _ = optimisation_step(method, method, optimizer, batch, step, cfg.optim.lr, cfg.optim.weight_decay,
                                    clip_grad=cfg.optim.clip_grad)
        losses.append(float(loss))
    return losses


RECORDED = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}


@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_recipe_gives_the_recorded_losses(recipe):
    torch.set_num_threads(1)
    assert recipe_losses(recipe) == pytest.approx(RECORDED[recipe], rel=1e-5, abs=1e-6)


def test_every_recorded_recipe_still_exists():
    assert RECORDED, "fixtures/recipe_losses.json is missing"
    for recipe in RECORDED:
        assert (CONFIG_ROOT / f"{recipe}.yaml").is_file(), recipe


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(1)
    recipes = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml"))
    FIXTURE.write_text(json.dumps({r: recipe_losses(r) for r in recipes}, indent=1) + "\n")
    print(f"written: {FIXTURE}")
