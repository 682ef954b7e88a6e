"""Named registries of plugins: methods, datasets and backbones.

A registry maps a name (``dino``, ``cifar10``, ``resnet18``) to an object and is the one source
of truth for the choices a config key accepts and for the "unknown X" error. Plugins add
themselves where they are defined::

    @METHODS.register("toy")
    class ToyMethod(SSLMethod): ...

A registry may also read a Python entry-point group (``nocollapse.methods``): an installed
package that declares ``[project.entry-points."nocollapse.methods"] toy = "toy_pkg.method"``
is imported the first time the registry is asked for its names, and its module registers itself
as above (an entry point that loads an object not yet registered is registered under the entry
point's name).

The built-in plugins (``nocollapse.data``, ``.models``, ``.methods``) register when their modules
are imported. The package's registries import them the first time they are read (names, look-up,
membership, default), before the entry points, through the loader that ``nocollapse/__init__.py``
sets with :func:`set_builtin_loader`; so ``import nocollapse`` stays light (no torchvision, not even
torch) and this leaf module imports nothing above it.
"""

from __future__ import annotations

import difflib
import logging
from importlib import metadata
from typing import Any, Callable, Iterator

log = logging.getLogger("nocollapse")


# The loader of the built-in plugins, set by the package facade; run once, on the first read of a
# registry created with ``builtins=True``.
_builtin_loader: Callable[[], None] | None = None
_builtins_loaded = False


def set_builtin_loader(loader: Callable[[], None] | None) -> None:
    """Set the callable that imports the built-in plugins; the registries made with
    ``builtins=True`` run it once, the first time one of them is read."""
    global _builtin_loader, _builtins_loaded
    _builtin_loader, _builtins_loaded = loader, False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded or _builtin_loader is None:
        return
    # Marked first: the modules the loader imports register plugins, and a look-up among them
    # must not start the loader again.
    _builtins_loaded = True
    try:
        _builtin_loader()
    except BaseException:
        _builtins_loaded = False      # the next read tries again and raises the same error
        raise


class UnknownNameError(ValueError):
    """A name that no plugin registered, with the known names and the closest ones."""


class Registry:
    """An ordered mapping ``name -> object`` filled by :meth:`register`.

    ``builtins=True`` (the package's own registries): the first read imports the built-in
    plugins through the loader of :func:`set_builtin_loader`."""

    def __init__(self, kind: str, entry_point_group: str | None = None, *, builtins: bool = False) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._entries: dict[str, Any] = {}
        self._default: str | None = None
        self._entry_points_loaded = entry_point_group is None
        #: bumped on every registration, so that derived views (the config schema) can be cached
        self.generation = 0

    # ---- registration ---------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, default: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that does so.

        ``default=True`` makes it the entry a config uses when the key is not set. Registering a
        different object under a taken name is an error (the same object again is a no-op)."""
        if obj is None:
            return lambda target: self.register(name, target, default=default)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.kind} name must be a Python identifier, got {name!r}")
        current = self._entries.get(name)
        if current is not None and current is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(current)}); "
                             f"choose another name")
        self._entries[name] = obj
        if default:
            self._default = name
        self.generation += 1
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary plugins)."""
        if self._entries.pop(name, None) is not None:
            if self._default == name:
                self._default = None
            self.generation += 1

    # ---- look-up --------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        # Every read passes here: the built-ins first, so that they keep their order (the
        # default first) ahead of the entry-point plugins.
        if self.builtins:
            _load_builtins()
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin must not break the library
                log.warning("could not load %s plugin %r from %s: %s", self.kind, ep.name, ep.value, exc)
                continue
            if ep.name not in self._entries and not isinstance(loaded, type(metadata)):
                self.register(ep.name, loaded)

    def names(self) -> tuple[str, ...]:
        self._load_entry_points()
        return tuple(self._entries)

    def default(self) -> str | None:
        self._load_entry_points()
        return self._default or next(iter(self._entries), None)

    def get(self, name: str) -> Any:
        self._load_entry_points()
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: Any) -> str:
        known = ", ".join(repr(n) for n in self.names()) or "none registered"
        msg = f"unknown {self.kind} {name!r}; known: {known}"
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        elif self.entry_point_group:
            msg += (f"; a {self.kind} defined in another package is known once its module is imported or "
                    f"the package is installed with an entry point in the group {self.entry_point_group!r}")
        return msg

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, Any]]:
        self._load_entry_points()
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


#: self-supervised methods (``method.name``), filled by ``nocollapse.methods`` and plugins
METHODS = Registry("method", entry_point_group="nocollapse.methods", builtins=True)
#: datasets (``data.dataset``), filled by ``nocollapse.data.registry``
DATASETS = Registry("dataset", entry_point_group="nocollapse.datasets", builtins=True)
#: backbones (``model.backbone``), filled by ``nocollapse.models.backbones``
BACKBONES = Registry("backbone", entry_point_group="nocollapse.backbones", builtins=True)

__all__ = ["BACKBONES", "DATASETS", "METHODS", "Registry", "UnknownNameError", "set_builtin_loader"]
