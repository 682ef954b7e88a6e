"""The run directory as a safe container: a manifest of what the package wrote, and a lock.

**Manifest.** ``RUN_DIR/manifest.json`` lists, relative to the run directory, every file that
nocollapse wrote there: the trainer's config, checkpoints, metrics, TensorBoard events, plots,
features and summaries, and what ``eval``, ``diagnose`` and ``export`` add. :func:`record` adds
paths *before* they are written (a crash in between leaves a listed path that does not exist,
never a written file that is not listed) and replaces the manifest atomically (a temporary file
and a rename). :func:`clear_run` (``train --force``) removes only the listed files, so files of
the user's own in the same directory, even inside ``plots/`` or ``features/``, survive. A run
directory written before the manifest existed falls back to the package's own artifact names
(:data:`RUN_ARTIFACTS`); a directory that is neither holds nothing of the package's, and nothing
is removed from it.

**Lock.** ``RUN_DIR/run.lock`` holds the pid, host and start time of the training run that uses
the directory, and the run holds an exclusive ``flock`` on it for its whole life.
:func:`acquire_run_lock` fails with a :class:`RunLockedError` naming that run while the lock is
held. The kernel drops a ``flock`` when its process ends, however it ends (``kill -9``
included), so a lock file left by a crash is recognised as stale and taken over; on this host
its pid must also be gone, which guards file systems where ``flock`` does nothing. The lock file
is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

try:  # POSIX; without it the lock rests on the pid alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("nocollapse")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nocollapse-manifest"
LOCK_NAME = "run.lock"

#: What runs written before the manifest existed hold (files, or folders of files): the only
#: names ``--force`` removes from such a run directory.
RUN_ARTIFACTS = ("checkpoints", "tensorboard", "plots", "features", "metrics.jsonl", "summary.json",
                 "diagnosis.json", "eval.json", "eval_balanced.json", "class_counts.json",
                 "labelled_indices.json")
#: why a run stopped before its end (a non-finite loss), written by the trainer as it stops and
#: listed in the manifest (runs written before manifests never had one)
FAILURE_NAME = "failure.json"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (not empty, damaged manifest, ...)."""


class RunLockedError(RunDirectoryError):
    """Another nocollapse run holds the run directory's lock."""


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

def _manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / MANIFEST_NAME


def _valid_entry(entry: object) -> bool:
    """A manifest entry names a path inside the run directory: relative, no ``..``."""
    if not isinstance(entry, str) or not entry or entry.startswith(("/", "\\")):
        return False
    parts = Path(entry).parts
    return not Path(entry).is_absolute() and ".." not in parts and parts[0] not in (MANIFEST_NAME, LOCK_NAME)


def read_manifest(run_dir: str | Path) -> list[str] | None:
    """The paths listed in ``run_dir``'s manifest (None when it has none). Entries that do not
    name a path inside the run directory are dropped; a manifest that cannot be read raises
    :class:`RunDirectoryError`, since what the package wrote is then unknown."""
    path = _manifest_path(Path(run_dir))
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"] if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None
        if not isinstance(files, list):
            raise ValueError("not a nocollapse manifest")
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise RunDirectoryError(
            f"{path} is damaged or not a nocollapse manifest ({exc}), so the files nocollapse wrote "
            f"in {run_dir} are not known; repair or delete it (deleting it makes --force fall back "
            f"to the package's own file names)") from None
    return [f for f in files if _valid_entry(f)]


def looks_like_legacy_run(run_dir: str | Path) -> bool:
    """A run directory written before the manifest existed: ``config.yaml`` next to a
    ``checkpoints/`` folder or a ``metrics.jsonl``, and no manifest."""
    run_dir = Path(run_dir)
    return (not _manifest_path(run_dir).exists() and (run_dir / "config.yaml").is_file()
            and ((run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()))


def _legacy_files(run_dir: Path) -> list[str]:
    """The files of a pre-manifest run under :data:`RUN_ARTIFACTS` names, and its config."""
    found = []
    for name in (*RUN_ARTIFACTS, "config.yaml"):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            found += [p.relative_to(run_dir).as_posix() for p in path.rglob("*") if not p.is_dir()]
        elif path.is_file() or path.is_symlink():
            found.append(name)
    return found


def _relative(run_dir: Path, path: str | Path) -> str | None:
    """``path`` (absolute, or relative to the working directory) relative to ``run_dir``, or
    None when it lies outside."""
    for a, b in ((os.path.abspath(path), os.path.abspath(run_dir)),
                 (os.path.realpath(path), os.path.realpath(run_dir))):
        rel = os.path.relpath(a, b)
        if rel != "." and not rel.startswith(".." + os.sep) and rel != "..":
            return Path(rel).as_posix()
    return None


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between processes (a trainer and an ``eval``
    of the same run) by a ``flock`` on the run directory itself; a no-op where that is not
    supported."""
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(run_dir, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the flock


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader, or a crash at any moment, finds the old file
    whole or the new one whole, never a part: the text goes to a hidden temporary beside it, is
    flushed to disk, and replaces ``path`` in one rename. A failed write leaves ``path`` as it
    was and removes the temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_json_atomically(path: str | Path, data: object, indent: int | None = 1) -> None:
    """``data`` as JSON at ``path``, written by :func:`write_text_atomically`. The JSON is made
    before anything is written, so data that cannot be serialised leaves no trace."""
    write_text_atomically(path, json.dumps(data, indent=indent) + "\n")


def _write_manifest(run_dir: Path, files: list[str]) -> None:
    write_json_atomically(_manifest_path(run_dir), {"format": MANIFEST_FORMAT, "version": 1, "files": files})


def record(run_dir: str | Path, *paths: str | Path) -> None:
    """Add ``paths`` (files the package is about to write) to ``run_dir``'s manifest.

    Paths outside ``run_dir`` are ignored (an ``eval --out`` elsewhere). The first manifest of a
    run directory written before manifests existed also lists that run's own files
    (:data:`RUN_ARTIFACTS`), so that they stay known as the package's. A damaged manifest is
    replaced, with a warning: files it listed are no longer removed by ``--force``."""
    run_dir = Path(run_dir)
    wanted = [r for r in (_relative(run_dir, p) for p in paths) if r is not None and _valid_entry(r)]
    if not wanted:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(run_dir):
        try:
            listed = read_manifest(run_dir)
        except RunDirectoryError as exc:
            log.warning("%s; writing a new one", exc)
            listed = []
        if listed is None:
            listed = _legacy_files(run_dir) if looks_like_legacy_run(run_dir) else []
        files = list(dict.fromkeys([*listed, *wanted]))
        if files != listed or not _manifest_path(run_dir).is_file():
            _write_manifest(run_dir, files)


def _remove_file(run_dir: Path, root: Path, entry: str) -> bool:
    """Remove the listed file ``entry`` if it is still a file (or link) inside the run directory;
    a folder or a path that now leads outside (a folder replaced by a link) is left alone."""
    path = run_dir / entry
    try:
        parent = path.parent.resolve()
    except OSError:
        return False
    if parent != root and root not in parent.parents:
        return False
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    return False


def clear_run(run_dir: str | Path) -> list[Path]:
    """Remove what an earlier run wrote in ``run_dir`` (``train --force``) and return it.

    With a manifest: exactly the listed files, then the folders that removing them left empty,
    then the manifest. Without one: the :data:`RUN_ARTIFACTS` of a run written before manifests
    existed, or nothing when the directory does not look like a run. Files of the user's own
    are never removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    listed = read_manifest(run_dir)
    removed: list[Path] = []
    if listed is None:
        if not looks_like_legacy_run(run_dir):
            return []
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                removed.append(path)
            elif path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
        return removed
    root = run_dir.resolve()
    for entry in listed:
        if _remove_file(run_dir, root, entry):
            removed.append(run_dir / entry)
    # folders the package made and that now hold nothing (deepest first); never the run dir
    for folder in sorted({p.parent for p in (run_dir / e for e in listed)}, key=lambda p: -len(p.parts)):
        while folder != run_dir and run_dir in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
    _manifest_path(run_dir).unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------------------------
# Occupancy
# --------------------------------------------------------------------------------------------

def holds_a_run(run_dir: str | Path) -> bool:
    """``run_dir`` holds (part of) a nocollapse run: a manifest or a config.yaml."""
    run_dir = Path(run_dir)
    return _manifest_path(run_dir).is_file() or (run_dir / "config.yaml").is_file()


def is_empty(run_dir: str | Path) -> bool:
    """``run_dir`` does not exist, or holds nothing but a run lock."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return not run_dir.exists()
    return all(p.name == LOCK_NAME for p in run_dir.iterdir())


def refuse_if_locked(run_dir: str | Path) -> None:
    """Raise :class:`RunLockedError`, naming the run, when another run holds ``run_dir``."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunLockedError(_locked_message(Path(run_dir), holder))


def refuse_unless_empty(run_dir: str | Path, check_lock: bool = True) -> None:
    """Raise :class:`RunLockedError` when another run holds ``run_dir`` (unless ``check_lock`` is
    False: the caller holds the lock itself), and :class:`RunDirectoryError` when it is not
    empty: a new run goes into a new or empty directory unless ``--force`` (or ``--resume``)
    says otherwise."""
    run_dir = Path(run_dir)
    if check_lock:
        refuse_if_locked(run_dir)
    if is_empty(run_dir):
        return
    if holds_a_run(run_dir):
        raise RunDirectoryError(
            f"{run_dir} already holds a run; use --resume to continue it, --force to replace it "
            f"(only the files nocollapse wrote there are removed), or another --out")
    raise RunDirectoryError(
        f"{run_dir} is not empty and holds no nocollapse run; choose a new or empty --out, or pass "
        f"--force to train into it anyway (its files are kept: --force removes only what "
        f"nocollapse wrote)")


# --------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _try_flock(fd: int) -> bool | None:
    """True: this descriptor now holds the exclusive flock; False: another holds it; None: the
    file system does not support flock here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _alive_by_pid(holder: dict, flock_supported: bool) -> bool:
    """Whether the run a lock file names may still run although its flock is free: on this host,
    while its pid exists; on another host, only when flock cannot tell."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("host") == socket.gethostname():
        return pid != os.getpid() and _pid_alive(pid)
    return not flock_supported and bool(holder.get("host"))


def _locked_message(run_dir: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    command = holder.get("command")
    text = f"{run_dir} is in use by another nocollapse run ({who}"
    text += f": {command})" if command else ")"
    return (text + "; wait for it to end or stop it, or choose another --out. A lock left by a run "
            f"that has ended is taken over by the next run; if that run is surely gone, delete "
            f"{Path(run_dir) / LOCK_NAME}")


def lock_holder(run_dir: str | Path) -> dict | None:
    """Who holds ``run_dir``'s lock (pid, host, started, command), or None when nobody does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read_holder(path)
        if fcntl is not None:
            try:  # a shared lock is refused while a run holds the exclusive one
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return holder or {"pid": "?"}
            except OSError:
                return holder if _alive_by_pid(holder, False) else None
            return holder if _alive_by_pid(holder, True) else None
        return holder if _alive_by_pid(holder, False) else None
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run directory, held until :meth:`release` (or garbage collection).
    ``created_dir``: the directory did not exist before the lock; it is removed on release if
    the run left nothing in it (a run refused before its first write leaves no trace)."""

    def __init__(self, path: Path, fd: int, created_dir: bool = False) -> None:
        self.path, self._fd, self.created_dir = path, fd, created_dir

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file (while still holding it, so no other run can have taken this
        very file) and drop the flock. Safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only if empty

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Take ``run_dir``'s lock for this process (creating the directory), or raise
    :class:`RunLockedError` naming the run that holds it. A lock file whose run has ended is
    taken over."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got = _try_flock(fd)
            if got is False:
                raise RunLockedError(_locked_message(run_dir, _read_holder(path) or {"pid": "?"}))
            if not _same_file(fd, path):  # its holder released (deleted) it after we opened it
                os.close(fd)
                continue
            previous = _read_holder(path)
            if previous and _alive_by_pid(previous, got is True):
                raise RunLockedError(_locked_message(run_dir, previous))
            if previous:
                log.info("taking over the lock of %s left by pid %s (started %s), which has ended",
                         run_dir, previous.get("pid", "?"), previous.get("started", "?"))
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_unix": time.time(),
                    "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            return RunLock(path, fd, created_dir=created)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise RunLockedError(f"could not take the lock of {run_dir}: other processes keep replacing {path}")


__all__ = ["FAILURE_NAME", "LOCK_NAME", "MANIFEST_NAME", "RUN_ARTIFACTS", "RunDirectoryError", "RunLock", "RunLockedError",
           "acquire_run_lock", "clear_run", "holds_a_run", "is_empty", "lock_holder", "looks_like_legacy_run",
           "read_manifest", "record", "refuse_if_locked", "refuse_unless_empty"]
