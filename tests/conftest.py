"""Shared fixtures: a tiny, fast configuration for end-to-end runs on the digits dataset, the
benchmark scripts as modules, and a decoded-image cache of the test's own."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# A run of a few seconds: 8 px digits, a ResNet-18 at 1/8 width, a small head and K = 32.
TINY = [
    "data.image_size=8",
    "model.width_multiplier=0.125",
    "method.num_prototypes=32",
    "method.head.hidden_dim=64",
    "method.head.bottleneck_dim=16",
    "train.epochs=2",
    "train.batch_size=64",
    "train.log_every=2",
    "train.progress=false",
    "train.threads=1",
    "eval.batch_size=256",
]


def pytest_configure(config) -> None:
    """Under pytest-xdist (``-n 2``, the README's command) each worker process has one core of its
    own: one torch thread, and one for each process a test starts. Left to their defaults, two
    workers would each start a thread per core and spin against each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(autouse=True)
def _decode_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the decoded-image cache (data.decode_cache=auto) out of the user's home directory."""
    monkeypatch.setenv("NOCOLLAPSE_CACHE", str(tmp_path_factory.mktemp("nocollapse-cache")))


@pytest.fixture(scope="session")
def import_benchmark() -> Callable[[str], ModuleType]:
    """Import ``benchmarks/<name>.py``: the benchmarks are scripts that import their ``common``
    module as a sibling, so their folder is on the path while they are imported."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(BENCHMARKS))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS))
    return load


@pytest.fixture(params=[None, 40], ids=["one-block", "many-blocks"])
def row_block_elements(request, monkeypatch):
    """The passes over row blocks (``nocollapse.utils.blocks``) at their default size, where the
    tests' small matrices fit one block, and at 40 elements, which splits them into blocks of a
    row or a few."""
    from nocollapse.utils import blocks

    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", request.param)
    return request.param
