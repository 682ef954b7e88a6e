"""Load the prototypes of a model trained elsewhere (DINO, iBOT, CARP, SwAV, ...).

:func:`load_prototypes` reads a checkpoint with
``torch.load(path, map_location="cpu", weights_only=True)`` (no arbitrary code runs;
``argparse.Namespace``, which DINO-family checkpoints use to store their arguments,
is the one extra class allowed) and returns the prototype matrix as rows ``[K, D]``.

Key paths are dotted and may cross nested dicts and flat state-dict keys alike:
``teacher.head.last_layer.weight`` finds ``ckpt["teacher"]["head.last_layer.weight"]``
as well as ``ckpt["teacher"]["head"]["last_layer"]["weight"]``. ``module.`` segments
(DistributedDataParallel) and ``_orig_mod.`` segments (``torch.compile``) in the
stored keys are ignored when the key does not match exactly.

Weight normalisation: when ``<prefix>.weight`` is not stored but its weight-norm
parametrisation is, the weight is rebuilt as

.. math:: w_k = g_k \\, v_k / \\lVert v_k \\rVert

(norm over every dimension in which ``g`` has size 1, i.e. per output row for the
default ``dim=0``) from either the legacy ``torch.nn.utils.weight_norm`` pair
``<prefix>.weight_g`` / ``<prefix>.weight_v`` or the
``torch.nn.utils.parametrizations.weight_norm`` pair
``<prefix>.parametrizations.weight.original0`` (g) / ``original1`` (v).

A ``nn.Linear(D, K)`` weight is already ``[K, D]``; pass ``transpose=True`` for a
checkpoint that stores prototypes as columns ``[D, K]``.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.checkpoint import CheckpointError, describe_unreadable

__all__ = ["load_prototypes", "list_candidates", "CheckpointError", "PrototypeKeyError"]

_IGNORED_SEGMENTS = ("module", "_orig_mod")
_LEGACY_G, _LEGACY_V = "weight_g", "weight_v"
_PARAM_G = "parametrizations.weight.original0"
_PARAM_V = "parametrizations.weight.original1"
_PREFERRED_WORDS = ("last_layer", "prototype", "proto", "head", "teacher")


class PrototypeKeyError(KeyError):
    """The requested key is not in the checkpoint (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


def _load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on foreign or damaged files
        reason = describe_unreadable(path, exc)
        if reason.startswith("stores Python objects"):
            reason += ("; if you trust the file, load it yourself and save just the state dict with "
                       "torch.save")
        raise CheckpointError(f"{path} {reason}") from None


def _flatten(obj: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dotted paths of every tensor in nested dicts / lists (``a.b.0.c``)."""
    out = {} if out is None else out
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out)
    return out


def _canonical(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in _IGNORED_SEGMENTS)


def _weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """``g * v / ||v||`` with the norm over the dimensions in which ``g`` has size 1."""
    g64, v64 = g.double(), v.double()
    if g64.numel() == 1:
        norm = torch.linalg.vector_norm(v64)
    else:
        if g64.ndim != v64.ndim:
            raise ValueError(f"weight-norm g {tuple(g.shape)} does not match v {tuple(v.shape)}")
        dims = [d for d in range(v64.ndim) if g64.shape[d] == 1]
        norm = torch.linalg.vector_norm(v64, dim=dims, keepdim=True)
    return (g64 * v64 / norm).to(v.dtype if v.is_floating_point() else torch.float32)


class _Index:
    """Lookup of dotted keys in a flattened checkpoint, with weight-norm resolution."""

    def __init__(self, obj: Any) -> None:
        self.tensors = _flatten(obj)
        self.canonical: dict[str, str] = {}
        for key in self.tensors:
            self.canonical.setdefault(_canonical(key), key)

    def raw(self, key: str) -> Tensor | None:
        if key in self.tensors:
            return self.tensors[key]
        real = self.canonical.get(_canonical(key))
        return self.tensors[real] if real is not None else None

    def get(self, key: str) -> Tensor | None:
        found = self.raw(key)
        if found is not None:
            return found
        if key == "weight" or key.endswith(".weight"):
            base = key[: -len("weight")]
            for g_name, v_name in ((_LEGACY_G, _LEGACY_V), (_PARAM_G, _PARAM_V)):
                g, v = self.raw(base + g_name), self.raw(base + v_name)
                if g is not None and v is not None:
                    return _weight_norm(g, v)
            return None
        # a module path: "head.last_layer" -> "head.last_layer.weight"
        return self.get(f"{key}.weight") if key else None

    def virtual_keys(self) -> list[str]:
        """Stored keys plus the ``...weight`` keys that weight norm can rebuild."""
        keys = list(self.tensors)
        for key in self.tensors:
            for g_name, v_name in ((_LEGACY_G, _LEGACY_V), (_PARAM_G, _PARAM_V)):
                if key.endswith(v_name) and (key[: -len(v_name)] + g_name) in self.tensors:
                    keys.append(key[: -len(v_name)] + "weight")
        return keys


def _describe(index: _Index, keys: list[str]) -> str:
    lines = []
    for key in keys:
        t = index.get(key)
        shape = "x".join(str(s) for s in t.shape) if t is not None else "?"
        lines.append(f"  {key}  [{shape}]")
    return "\n".join(lines)


def _rank_candidates(index: _Index) -> list[str]:
    cands = []
    for key in index.virtual_keys():
        if key.endswith((_LEGACY_G, _LEGACY_V, _PARAM_G, _PARAM_V)):
            continue
        t = index.get(key)
        if t is not None and t.ndim == 2 and t.is_floating_point():
            cands.append(key)

    def score(key: str) -> tuple[int, int]:
        lowered = key.lower()
        hits = sum(word in lowered for word in _PREFERRED_WORDS)
        rows = int(index.get(key).shape[0])  # type: ignore[union-attr]
        return (-hits, -rows)

    return sorted(dict.fromkeys(cands), key=score)


def list_candidates(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """2-D floating-point tensors in a checkpoint (weight-norm weights included), most
    prototype-like first (names with ``last_layer`` / ``prototype`` / ``head``, then more rows)."""
    index = _Index(_load(Path(path)))
    return [(key, tuple(index.get(key).shape)) for key in _rank_candidates(index)]  # type: ignore[union-attr]


def load_prototypes(path: str | Path, key: str | None = None, *, transpose: bool = False) -> Tensor:
    """Prototype rows ``[K, D]`` (float32 or the stored float dtype) from a checkpoint file.

    Args:
        path: a file written by ``torch.save`` (a state dict, a nested checkpoint dict, or a
            bare tensor).
        key: dotted key path, e.g. ``"teacher.head.last_layer.weight"``; a module path such as
            ``"teacher.head.last_layer"`` also works. Required unless the file holds a bare
            2-D tensor.
        transpose: return the transpose (for checkpoints that store prototypes as columns).

    Raises:
        CheckpointError: missing, damaged or non-checkpoint file.
        PrototypeKeyError: ``key`` not found (the message lists the closest keys), or
            ``key`` is None (the message lists the candidate 2-D tensors).
        ValueError: the tensor at ``key`` is not 2-D floating point.
    """
    path = Path(path)
    obj = _load(path)
    if isinstance(obj, Tensor):
        if key is not None:
            raise PrototypeKeyError(
                f"{path} holds a bare tensor of shape {tuple(obj.shape)}; call with key=None"
            )
        tensor = obj
    else:
        if not isinstance(obj, (Mapping, list, tuple)):
            raise CheckpointError(
                f"{path} holds a {type(obj).__name__}, not a state dict or tensor"
            )
        index = _Index(obj)
        if not index.tensors:
            raise CheckpointError(f"{path} contains no tensors")
        if key is None:
            cands = _rank_candidates(index)
            listing = _describe(index, cands[:20]) if cands else "  (none)"
            raise PrototypeKeyError(
                f"{path}: pass key= to choose the prototype matrix; 2-D tensors found:\n{listing}"
            )
        found = index.get(key)
        if found is None:
            known = index.virtual_keys()
            pool = list(dict.fromkeys(known + [_canonical(k) for k in known]))
            close = difflib.get_close_matches(key, pool, n=5, cutoff=0.3)
            if not close:
                close = _rank_candidates(index)[:5]
            raise PrototypeKeyError(
                f"key {key!r} not found in {path}. Closest keys:\n" + "\n".join(f"  {c}" for c in close)
            )
        tensor = found
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ValueError(
            f"expected a 2-D floating-point prototype matrix, got shape {tuple(tensor.shape)} "
            f"and dtype {tensor.dtype}"
        )
    tensor = tensor.detach()
    return tensor.T.contiguous() if transpose else tensor
