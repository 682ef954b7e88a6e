"""Checkpoints: atomic writes, pruning, safe loading.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed
over the destination, so a crash during a write leaves the previous file intact and ``last.pt``
is always loadable. Files are read with ``torch.load(weights_only=True)``: only tensors and plain
containers are accepted, and a foreign or damaged file is rejected with a clear message.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "nocollapse-checkpoint"
VERSION = 1
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, foreign or otherwise cannot be used."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a nocollapse checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is damaged or not a plain-tensor checkpoint and was not loaded "
            f"(torch.load with weights_only=True said: {first})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a nocollapse checkpoint (found {keys}); to diagnose prototypes "
            f"of a model trained elsewhere use `nocollapse diagnose --weights FILE --key ...`")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer nocollapse (format {obj['version']})")
    return obj


def epoch_checkpoints(directory: str | Path) -> list[Path]:
    """Epoch checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch checkpoints (``keep = 0`` keeps all)."""
    if keep <= 0:
        return []
    old = epoch_checkpoints(directory)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


# --------------------------------------------------------------------------------------------
# RNG state as plain tensors / numbers (weights_only-safe)
# --------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
