"""nocollapse: self-supervised learning whose prototypes and embeddings do not collapse.

Importing the package registers the built-in datasets, backbones and methods in the registries
of :mod:`nocollapse.utils.registry`, so that every configuration sees them.

:class:`CollapseMonitor` watches any training loop for collapse, and :class:`DecoupledPrototypes`
puts the online-EM prototypes into it (see ``examples/``); :class:`OnlineProbe` adds an online
k-NN and linear probe to the monitor when the loop has labels.
"""

from . import data, methods, models  # noqa: F401  (register the built-in plugins)
from .diagnostics.monitor import CollapseMonitor
from .evaluation.online import OnlineProbe
from .prototypes.decoupled import DecoupledPrototypes
from .version import __version__

__all__ = ["CollapseMonitor", "DecoupledPrototypes", "OnlineProbe", "__version__"]
