"""Opening files hpc did not write: regular files only, read with bounds.

A FIFO blocks ``open()`` (and ``read()``) until someone writes to it, a device such as /dev/zero never
ends, and a name can be swapped for either between a check and an open. So every file a user (or
a manifest, a lock, a checkpoint directory) names is opened non-blocking first and checked with
``fstat`` on the descriptor itself: what is read is the file that was checked.

    data = read_bounded(path, "header", limit)           # bytes of a small regular file
    fd = open_regular(path, "checkpoint")                 # a descriptor of a regular file
    with regular_path(path, "shard") as p:                # a name for libraries that open by name
        h5py.File(p, "r")                                 # (/proc/self/fd/N: the checked inode)
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from hpc.errors import HpcError, InputError

MAX_HEADER_BYTES = 1 << 20  # real headers are a few KB; anything bigger is refused unread


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, what: str, error: type[HpcError] = InputError,
                 follow: bool = True) -> int:
    """A read-only descriptor of ``path`` if it is a regular file, else ``error`` (one line naming
    it). Non-blocking, so a FIFO is refused instead of waited on; ``follow=False`` also refuses a
    symbolic link (for names inside directories hpc owns, where nobody else should place links)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise error(f"{path}: a symbolic link, not a {what} file (hpc never follows a link here)") from None
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {file_kind(mode)}, not a {what} file")
    return fd


def read_bounded(path: str | os.PathLike, what: str, limit: int = MAX_HEADER_BYTES,
                 error: type[HpcError] = InputError, follow: bool = True) -> bytes:
    """The bytes of a small regular file, read only after checking that it is one: a FIFO or a
    device (/dev/zero) would block or never end, and a multi-GB data file given by mistake must not
    be read into memory."""
    fd = open_regular(path, what, error, follow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: {size} bytes is too large for a {what} (limit {limit}): "
                        "is this the data file?")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while being read
            raise error(f"{path}: more than {limit} bytes, too large for a {what}")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def regular_path(path: str | os.PathLike, what: str, error: type[HpcError] = InputError) -> Iterator[Path]:
    """A path naming the regular file ``path`` as it was checked: ``/proc/self/fd/N`` of a checked
    descriptor (a library opening it gets that inode, even if the name was swapped for a FIFO
    since), or ``path`` itself where /proc is not available."""
    fd = open_regular(path, what, error)
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        yield proc if proc.exists() else Path(path)
    finally:
        os.close(fd)
