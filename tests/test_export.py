"""``nocollapse export``: the backbone as a plain state dict with torchvision's key names."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from nocollapse.config import build_config
from nocollapse.models.backbones import build_backbone


def test_a_full_width_resnet_backbone_has_torchvision_keys_and_shapes():
    cfg, _ = build_config(overrides=["model.width_multiplier=1.0", "model.stem=imagenet"])
    ours = build_backbone(cfg.model, 224).state_dict()
    reference = torchvision.models.resnet18()
    missing, unexpected = reference.load_state_dict(ours, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert value.shape == ours[key].shape, key


@pytest.mark.slow
def test_export_writes_a_state_dict_loadable_without_nocollapse(tmp_path, tiny_overrides):
    from nocollapse.cli import main
    from nocollapse.runs import load_run

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--set", *tiny_overrides, "train.epochs=1"]) == 0
    out = tmp_path / "backbone.pt"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    expected = load_run(run_dir).method.eval_backbone().state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    info = json.loads((tmp_path / "backbone.pt.json").read_text())
    assert info["backbone"] == "resnet18" and info["network"] == "teacher backbone"


def test_export_of_a_missing_run_fails_clearly(tmp_path, capsys):
    from nocollapse.cli import main

    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.pt")]) == 2
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()
