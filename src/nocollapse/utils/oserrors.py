"""Operating-system errors as sentences: what failed, where, why (the errno's meaning and name)
and what to do, instead of a traceback.

:func:`describe_os_error` is used by the command line for every ``OSError`` that reaches it, and
by the trainer for a checkpoint that cannot be written.
"""

from __future__ import annotations

import errno
import os

# what a user can do about the common errors of writing a run directory
_REMEDIES: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free some space or choose a directory on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a directory on another disk",
    errno.EACCES: "the directory is not writable by this user: choose another directory or change "
                  "its permissions",
    errno.EPERM: "the operation is not permitted here: choose another directory or change its "
                 "permissions",
    errno.EROFS: "the file system is mounted read-only: choose a directory on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "the path is a directory where a file was expected: choose another path",
    errno.EEXIST: "a file of that name is in the way: remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n) or lower data.num_workers",
    errno.EIO: "the disk reported an input/output error: check the device",
}


def errno_name(code: int | None) -> str:
    """``ENOSPC`` for 28, and so on ("" when unknown)."""
    return errno.errorcode.get(code, "") if code is not None else ""


def describe_os_error(exc: OSError, action: str = "", path: str | os.PathLike | None = None) -> str:
    """One sentence for ``exc``: ``cannot ACTION PATH: MEANING (ENAME); WHAT TO DO``.

    ``action`` is what was being done (``"write checkpoint"``, default ``"use"``) and ``path``
    what it was done to (default: the path or paths the error names; a failed write of an
    already open file names none)."""
    meaning = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc) or type(exc).__name__
    name = errno_name(exc.errno)
    names = (path,) if path is not None else (exc.filename, exc.filename2)
    where = " -> ".join(str(p) for p in names if p is not None)
    subject = f"cannot {action}" if action else "cannot use"
    text = f"{subject} {where}" if where else subject
    text += f": {meaning[0].lower() + meaning[1:] if meaning else meaning}"
    if name:
        text += f" ({name})"
    remedy = _REMEDIES.get(exc.errno) if exc.errno is not None else None
    return text + (f"; {remedy}" if remedy else "")


__all__ = ["describe_os_error", "errno_name"]
