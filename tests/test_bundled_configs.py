"""Every bundled config file is valid (keys, types, values, method options)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nocollapse.config import build_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "src" / "nocollapse" / "configs").rglob("*.yaml"))


def test_configs_are_bundled():
    names = {p.stem for p in CONFIGS}
    assert {"digits", "cifar10"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name == "gpu" else p.parent)))
def test_bundled_config_is_valid(path):
    cfg, _ = build_config(path, ["data.root=/nonexistent"] if "cifar10" in str(path) else [])
    assert cfg.train.epochs >= 1
