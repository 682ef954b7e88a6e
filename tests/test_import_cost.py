"""Importing nocollapse stays light: the slow dependencies load where they are used.

Each check imports in a fresh interpreter and reads ``sys.modules``, so nothing here is timed
(benchmarks/import_cost.py measures the seconds). ``import nocollapse`` and ``nocollapse --help``
load not even torch; the public subpackages and the built-in plugins load torch but none of
torchvision, scikit-learn, SciPy, matplotlib, TensorBoard or kornia, which only the functions that
use them import. The names these lazy imports hide must still resolve where they did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Loaded only inside the functions that need them.
SLOW = ("torchvision", "sklearn", "scipy", "matplotlib", "tensorboard", "torch.utils.tensorboard", "kornia",
        "lightning")
# Not needed by `import nocollapse` or by the command line's help either.
NOT_FOR_HELP = (*SLOW, "torch", "numpy", "omegaconf", "yaml", "PIL")


def loaded_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """The modules of ``watch`` in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = code + textwrap.dedent(f"""
        import json as _json, sys as _sys
        print(_json.dumps([m for m in {list(watch)!r} if m in _sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


HELP = """
import contextlib, io
from nocollapse.cli import main
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["--version"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
"""


@pytest.mark.parametrize("code", ["import nocollapse", "import nocollapse.cli", HELP],
                         ids=["import", "cli", "help"])
def test_the_package_and_the_help_load_no_dependency(code):
    assert loaded_after(code, NOT_FOR_HELP) == []


@pytest.mark.parametrize("module", ["nocollapse.diagnostics", "nocollapse.evaluation", "nocollapse.prototypes",
                                    "nocollapse.models", "nocollapse.data", "nocollapse.methods",
                                    "nocollapse.engine.trainer", "nocollapse.analysis", "nocollapse.runs"])
def test_the_subpackages_load_no_slow_dependency(module):
    assert loaded_after(f"import {module}", SLOW) == []


def test_the_public_names_and_the_builtin_plugins_load_no_slow_dependency():
    code = """
from nocollapse import CollapseMonitor, DecoupledPrototypes, OnlineProbe
from nocollapse.utils.registry import BACKBONES, DATASETS, METHODS
assert "dino" in METHODS and "resnet18" in BACKBONES and "digits" in DATASETS
"""
    assert loaded_after(code, SLOW) == []


def test_the_check_sees_an_eager_import():
    """The checks above can fail: a slow module that is imported is reported."""
    assert loaded_after("import nocollapse; import scipy", NOT_FOR_HELP) == ["scipy", "numpy"]


def test_the_lazy_names_resolve():
    code = """
import nocollapse
from nocollapse import CollapseMonitor, DecoupledPrototypes, OnlineProbe, __version__
from nocollapse.diagnostics.monitor import CollapseMonitor as monitor_class
from nocollapse.evaluation import kmeans_clustering
from nocollapse.models import ResNetBackbone, ViTBackbone
from nocollapse.models import backbones
assert CollapseMonitor is monitor_class and nocollapse.CollapseMonitor is monitor_class
assert nocollapse.evaluation.kmeans_clustering is kmeans_clustering
assert backbones.ResNetBackbone is ResNetBackbone and backbones.ViTBackbone is ViTBackbone
assert ResNetBackbone.__module__ == "nocollapse.models.resnet" and ViTBackbone.__module__ == "nocollapse.models.vit"
for module in (nocollapse, nocollapse.models, backbones):
    for name in module.__all__:
        getattr(module, name)
    assert set(module.__all__) <= set(dir(module)), module
assert {"data", "diagnostics", "evaluation", "methods", "prototypes"} <= set(dir(nocollapse))
for module, name in ((nocollapse, "missing"), (nocollapse.models, "ResNet"), (backbones, "VisionTransformer")):
    try:
        getattr(module, name)
    except AttributeError:
        pass
    else:
        raise AssertionError(f"{module.__name__}.{name} resolved")
"""
    loaded_after(code, ())


def test_the_builtins_register_on_the_first_read():
    """After a bare ``import nocollapse`` the registries hold every built-in plugin, the default first."""
    code = """
import sys
import nocollapse
from nocollapse.utils.registry import BACKBONES, DATASETS, METHODS
assert "nocollapse.methods" not in sys.modules
assert METHODS.default() == "dino" and METHODS.names()[0] == "dino", METHODS.names()
assert {"carp", "simclr", "swav"} <= set(METHODS.names())
assert BACKBONES.default() == "resnet18" and "vit_small" in BACKBONES
assert "digits" in DATASETS.names()
"""
    loaded_after(code, ())


def test_the_registered_backbones_are_the_defined_ones():
    from nocollapse.models.backbones import _RESNET_NAMES, _VIT_NAMES
    from nocollapse.models.resnet import RESNETS
    from nocollapse.models.vit import VITS

    assert set(_RESNET_NAMES) == set(RESNETS) and set(_VIT_NAMES) == set(VITS)


def test_a_failed_builtin_load_is_retried(monkeypatch):
    from nocollapse.utils import registry

    calls = []

    def loader():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("broken")

    monkeypatch.setattr(registry, "_builtin_loader", loader)
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    plugins = registry.Registry("thing", builtins=True)
    with pytest.raises(ImportError, match="broken"):
        plugins.names()
    assert plugins.names() == () and plugins.names() == ()
    assert len(calls) == 2                         # retried once after the failure, then never again
    assert registry.Registry("other").names() == () and len(calls) == 2
