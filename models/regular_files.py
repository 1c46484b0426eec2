"""Opening a checkpoint's files only when they are regular files, judged on the descriptor actually opened.

Why: opening a FIFO blocks until a writer comes (a device may block, or never end), and with it the load. A check of
the path before the open leaves a window in which the file can be swapped; so the open itself never blocks
(``O_NONBLOCK``), ``fstat`` of the opened descriptor decides, and everything read is read through that descriptor.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


class NotRegularFile(ValueError):
    """A file a load would read that is a FIFO, device, socket or directory; the message names the file."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO", ...), from its ``st_mode``."""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading when it is a regular file; ``NotRegularFile`` naming it otherwise.

    The open returns at once whatever the file is; once ``fstat`` has found a regular file the descriptor is set
    back to blocking reads. ``OSError`` (missing, no permission) is the caller's to word.
    """
    fd = os.open(path, _FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path}: {file_kind(mode)}; only regular files are loaded")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The whole of ``path`` when it is a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def descriptor_path(f: BinaryIO, path: Path) -> str:
    """A path that opens the same file as ``f`` (``/proc/self/fd/N`` or ``/dev/fd/N``), for libraries that take a
    path only (safetensors): a swap of ``path`` after ``f`` was opened cannot reach them. ``path`` itself where the
    system has neither."""
    for base in ("/proc/self/fd", "/dev/fd"):
        candidate = f"{base}/{f.fileno()}"
        if os.path.exists(candidate):
            return candidate
    return str(path)
