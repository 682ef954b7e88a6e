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


class _RecordingWriter:
    """The file ``torch.save`` writes to, remembering the ``OSError`` of a failed write: torch
    turns it into ``RuntimeError: [enforce fail at inline_container.cc] ...``, which says
    nothing of a full disk or a read-only file system."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _os_error_of(exc: BaseException, recorded: OSError | None) -> OSError | None:
    """The ``OSError`` behind a failed ``torch.save``: the one its writer recorded, or one in the
    exception's chain."""
    if recorded is not None:
        return recorded
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename.

    A failed write (full disk, read-only file system) raises the ``OSError`` that caused it,
    with its errno, rather than torch's ``RuntimeError``; the temporary file is removed and the
    previous ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            writer = _RecordingWriter(fh)
            try:
                torch.save(obj, writer)
            except RuntimeError as exc:
                cause = _os_error_of(exc, writer.error)
                if cause is None:
                    raise
                raise cause from None
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files ``.NAME.tmp-PID`` that :func:`atomic_save` left in
    ``directory`` when its process was killed mid-write; a file whose process still runs on
    this machine is left alone (it may be writing it now). Returns the removed files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def describe_unreadable(path: str | Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, as the end of a sentence that starts
    with the path: an empty file, a file that is not a PyTorch checkpoint at all, one that is
    damaged or truncated, or one that stores Python objects other than tensors and plain
    containers. torch's own message advises loading the file again with ``weights_only=False``,
    which runs whatever code the file holds; that advice is never repeated."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is empty (0 bytes): damaged or truncated"
    # torch.save writes a zip archive, or (legacy format) a pickle that starts with a magic number
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a")):
        return ("is not a PyTorch checkpoint (neither the zip archive nor the legacy pickle that "
                "torch.save writes)")
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and refused:
        return (f"stores Python objects other than tensors and plain containers (such as "
                f"{refused.group(1)}); nocollapse reads files with torch.load(weights_only=True), "
                f"which does not load them")
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    if "weights_only" in first or "Weights only" in first:
        first = "its pickled data cannot be read"
    return f"is not a readable PyTorch checkpoint: it is damaged or truncated ({first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a nocollapse checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path} {describe_unreadable(path, exc)}; it was not loaded") from None
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
