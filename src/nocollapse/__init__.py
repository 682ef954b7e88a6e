"""nocollapse: self-supervised learning whose prototypes and embeddings do not collapse.

The built-in datasets, backbones and methods are in the registries of
:mod:`nocollapse.utils.registry` from the first time a registry is read, so that every
configuration sees them. Importing the package itself is light: the public names below, the
subpackages and the built-in plugins load on first use, so that ``import nocollapse`` and
``nocollapse --help`` do not wait for torch, torchvision, SciPy, scikit-learn or matplotlib.

:class:`CollapseMonitor` watches any training loop for collapse, and :class:`DecoupledPrototypes`
puts the online-EM prototypes into it (see ``examples/``); :class:`OnlineProbe` adds an online
k-NN and linear probe to the monitor when the loop has labels.
"""

# Imported under private names, so that dir(nocollapse) lists the package's own names only.
import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from .utils import registry as _registry
from .version import __version__

if _TYPE_CHECKING:  # what type checkers see of the names __getattr__ below loads on first use
    from .diagnostics.monitor import CollapseMonitor
    from .evaluation.online import OnlineProbe
    from .prototypes.decoupled import DecoupledPrototypes


def _register_builtins() -> None:
    """Import the modules whose import registers the built-in plugins."""
    from . import data, methods, models  # noqa: F401


_registry.set_builtin_loader(_register_builtins)

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY_NAMES = {
    "CollapseMonitor": "nocollapse.diagnostics.monitor",
    "DecoupledPrototypes": "nocollapse.prototypes.decoupled",
    "OnlineProbe": "nocollapse.evaluation.online",
}
# subpackages and modules reachable as attributes (``nocollapse.evaluation``) without importing
# them first, as they were when the package imported them eagerly
_SUBMODULES = frozenset({
    "analysis", "cli", "config", "data", "diagnostics", "engine", "evaluation", "integrations",
    "losses", "methods", "models", "prototypes", "runs", "utils", "version",
})

__all__ = ["CollapseMonitor", "DecoupledPrototypes", "OnlineProbe", "__version__"]


def __getattr__(name: str) -> _Any:
    if name in _LAZY_NAMES:
        value = getattr(_importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value              # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
