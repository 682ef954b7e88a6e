"""The worked example of docs/adding_a_method.md runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from nocollapse.config import ConfigError, build_config
from nocollapse.utils.registry import METHODS

DOC = (Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.S)


@pytest.fixture
def documented_toy():
    """The doc's loss and method modules, with their package-relative imports made absolute."""
    loss_src, method_src = _blocks("python")
    loss = types.ModuleType("nocollapse.losses.toy")
    exec(compile(loss_src, "adding_a_method.md (loss)", "exec"), loss.__dict__)
    sys.modules["nocollapse.losses.toy"] = loss
    method_src = method_src.replace("from ..", "from nocollapse.").replace("from .base", "from nocollapse.methods.base")
    module = types.ModuleType("toy_method_from_docs")
    sys.modules[module.__name__] = module
    try:
        exec(compile(method_src, "adding_a_method.md (method)", "exec"), module.__dict__)
        yield loss, module
    finally:
        METHODS.unregister("toy")
        sys.modules.pop("nocollapse.losses.toy", None)
        sys.modules.pop(module.__name__, None)


def test_the_documented_loss_has_no_alignment_term_for_identical_views(documented_toy):
    loss, _ = documented_toy
    z = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    sq = torch.cdist(z, z).pow(2)
    expected = torch.log(torch.exp(-2.0 * sq[~torch.eye(16, dtype=torch.bool)]).mean())
    assert torch.allclose(loss.toy_loss(z, z, weight=5.0), expected)


def test_the_documented_method_registers_validates_and_trains(documented_toy, tmp_path):
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.methods import build_method
    from nocollapse.models.backbones import build_backbone
    from nocollapse.utils.optim import build_optimizer

    (recipe,) = [b for b in _blocks("yaml") if "name: toy" in b]
    path = tmp_path / "toy.yaml"
    path.write_text(recipe)
    cfg, _ = build_config(path, ["data.image_size=8", "model.width_multiplier=0.125"])
    assert cfg.method.name == "toy" and cfg.toy.dim == yaml.safe_load(recipe)["toy"]["dim"]
    with pytest.raises(ConfigError, match="toy.dim must be at most 4096"):
        build_config(path, ["toy.dim=5000"])
    with pytest.raises(ConfigError, match="method.num_prototypes only apply when method.name is one of 'dino', 'carp'"):
        build_config(path, ["method.num_prototypes=256"])
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.model, 8), steps_per_epoch=2)
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    crops = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    losses = [float(optimisation_step(method, method, optimizer, crops, s, 1e-3, 0.0)[0]) for s in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))


API_DOC = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n(.*?)```", API_DOC, re.S))))
def test_every_api_example_runs(index, capsys):
    block = re.findall(r"```python\n(.*?)```", API_DOC, re.S)[index]
    if "from lightly" in block:
        pytest.importorskip("lightly", reason="the lightly example needs the extra")
    exec(compile(block, f"api.md block {index}", "exec"), {})
