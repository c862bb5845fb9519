"""The one atomic writer: every file hpc writes (shards, sinograms and their headers, repaired HDF5,
checkpoints, exported models, JSON/YAML/text, PNGs, reports) appears whole or not at all.

    with AtomicFile("out/x.h5") as af:        # hidden temporary file in out/, created exclusively
        h5py.File(af.path, "w")...            # af.path names *our* open file (/proc/self/fd/N)
        af.commit()                           # fsync, umask permissions, rename, fsync the directory
    with atomic_path("report.png") as tmp:    # the same, committed when the block ends cleanly
        fig.savefig(tmp)
    with atomic_open("step.pt") as fh:        # a binary file object (torch.save reports disk
        torch.save(state, fh)                 # errors through it)
    atomic_write_text("config.yaml", text)

Why each step:
- The temporary name is ``.<name>.<16 random hex>.tmp`` in the destination directory (the rename must
  not cross filesystems), opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``: a file or symlink planted at
  that name makes the open fail and another name is drawn, so nothing is ever written through a
  link someone else placed. Libraries that want a path get ``/proc/self/fd/N``, which names the
  inode we created even if the directory entry is swapped underneath.
- fsync of the file before the rename and of the directory after it: after a crash or power cut
  the target is either the old file or the complete new one, never a renamed empty file.
- Permissions are what ``open()`` would give (0666 minus the umask): the temporary file is 0600
  while it is written (nobody reads a half-written file), widened just before the rename.
- A full disk, exhausted quota, read-only filesystem or refused permission becomes one
  :class:`OutputError` line naming the target, and the temporary file is removed.
- The writer holds an open-file-description read lock (``F_OFD_SETLK``) on its temporary file until
  it is renamed: the kernel drops it when the writer dies, however it dies, so :func:`sweep_stale`
  (probing with a write lock) can tell a temporary file left by a killed writer (removed) from one
  still being written (kept). Not ``flock``: HDF5 flocks the files it opens and would find ours
  taken; HDF5 writes our temporary files with its own locking off (hpc.io.h5write), where NFS
  would turn its flock into a byte-range lock that collides with this one.

Appended files (``metrics.jsonl``) are opened by :func:`append_open`: never through a symbolic
link, never anything but a regular file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from hpc.errors import OutputError

TMP_SUFFIX = ".tmp"
TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}\.tmp$")  # what AtomicFile names its temporary files
# errno -> words of the one-line error; HDF5 loses the errno in its own messages, so the
# strerror text is matched too
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
_STRERROR = {os.strerror(code): words for code, words in DISK_ERRORS.items()}


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; filesystems that cannot fsync a directory are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """The process umask, read without changing it (Linux >= 4.7 lists it in /proc/self/status);
    elsewhere by setting and restoring it (the only portable way, not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def disk_problem(exc: BaseException | None) -> str | None:
    """Words for a disk/permission failure in ``exc`` or the exceptions it was raised from or
    while handling (torch.save wraps the OSError of a full disk in a RuntimeError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in DISK_ERRORS:
                return DISK_ERRORS[exc.errno]
            text = str(exc)
            for strerror, words in _STRERROR.items():
                if strerror in text:
                    return words
        exc = exc.__cause__ or exc.__context__
    return None


def output_error(target: str | os.PathLike, exc: BaseException, what: str = "nothing written") -> OutputError | None:
    """The one-line OutputError for a disk problem while writing ``target``, else None."""
    words = disk_problem(exc)
    return None if words is None else OutputError(f"{target}: {words} ({what})")


def _ofd_lock(fd: int, kind: int) -> bool:
    """Take an open-file-description lock (F_WRLCK / F_RDLCK) on the whole file without waiting;
    False when another description holds a conflicting one or the system has no OFD locks."""
    op = getattr(fcntl, "F_OFD_SETLK", None)
    if op is None:
        return False
    try:
        fcntl.fcntl(fd, op, struct.pack("hhqqi", kind, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return True


def _self_path(fd: int, fallback: Path) -> Path:
    proc = Path(f"/proc/self/fd/{fd}")
    return proc if proc.exists() else fallback


class AtomicFile:
    """A hidden temporary file beside ``target``, renamed onto it by :meth:`commit`.

    ``fd`` is open read-write on the temporary file; ``path`` names that same file for libraries
    that open by name (h5py, matplotlib). Leaving the ``with`` block without ``commit()`` (an
    exception, or simply no commit) removes the temporary file and leaves ``target`` as it was.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.fd = -1
        self.tmp = self.target  # replaced below; never unlinked unless it is ours
        if os.path.isdir(self.target) and not os.path.islink(self.target):  # refused now, not after the work
            raise OutputError(f"{self.target}: is a directory; give a file name")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.fd, self.tmp = self._create()
        except OSError as exc:
            raise self._error(exc, "cannot create a file there") from None
        # "being written", released by the kernel when we die; a read lock, so that readers of the
        # temporary file (a shard verified before its rename) never collide with it
        _ofd_lock(self.fd, fcntl.F_RDLCK)
        self.path = _self_path(self.fd, self.tmp)
        self.committed = False

    def _create(self) -> tuple[int, Path]:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            tmp = self.target.with_name(f".{self.target.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")
            try:
                return os.open(tmp, flags, 0o600), tmp
            except FileExistsError:  # taken (or planted): draw another name, never open it
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.target.parent))

    def _error(self, exc: BaseException, fallback: str) -> OutputError:
        err = output_error(self.target, exc)
        if err is not None:
            return err
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return OutputError(f"{self.target}: {fallback}: {detail}")

    def _ours(self) -> bool:
        """The temporary name still names the file we created (nobody swapped it)."""
        try:
            st, mine = os.stat(self.tmp, follow_symlinks=False), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def write_all(self, data: bytes) -> None:
        """Write all of ``data`` to the temporary file (a full disk: one-line OutputError)."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise self._error(exc, "cannot write") from None

    def commit(self) -> Path:
        """fsync, give the umask's permissions, rename onto the target, fsync the directory."""
        try:
            os.fsync(self.fd)
            os.fchmod(self.fd, 0o666 & ~umask())
            if not self._ours():
                raise OutputError(f"{self.target}: temporary file {self.tmp.name} was replaced while "
                                  "writing (nothing written)")
            os.replace(self.tmp, self.target)  # still open: a failed rename leaves it ours to remove
        except OSError as exc:
            self.abort()
            raise self._error(exc, "cannot write") from None
        self.committed = True
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        fsync_dir(self.target.parent)
        return self.target

    def abort(self) -> None:
        """Remove the temporary file (only if it is still ours); the target is untouched."""
        if self.committed:
            return
        if self.fd >= 0:
            ours = self._ours()
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
            if ours:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.abort()
        if exc is not None and not isinstance(exc, OutputError):
            err = output_error(self.target, exc)
            if err is not None:
                raise err from None


def file_identity(path: str | os.PathLike) -> tuple[str, tuple[int, int] | None]:
    """(real path: symlinks, `..` and `./` resolved; (device, inode) when it exists: hard links)."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


class FileOwners:
    """Which file a path really is, by real path and by (device, inode): ``claim(path, who)``
    records it, ``owner(path)`` -> (who, real path) when it is (resolves to, or is a hard link of)
    a claimed file, else None. The one check behind "a command never overwrites what it reads"."""

    def __init__(self) -> None:
        self._who: dict[object, str] = {}

    def claim(self, path: str | os.PathLike, who: str) -> None:
        real, inode = file_identity(path)
        self._who[real] = who
        if inode is not None:
            self._who[inode] = who

    def owner(self, path: str | os.PathLike) -> tuple[str, str] | None:
        real, inode = file_identity(path)
        who = self._who.get(real) or (self._who.get(inode) if inode is not None else None)
        return (who, real) if who is not None else None


def refuse_onto(outputs: list[Path], inputs: list[Path]) -> None:
    """OutputError, before anything is written, if an output is (resolves to, or is a hard link of)
    one of ``inputs``: a command never overwrites what it reads."""
    owners = FileOwners()
    for p in inputs:
        owners.claim(p, f"the input {p}")
    for out in outputs:
        if clash := owners.owner(out):
            raise OutputError(f"{out}: would overwrite {clash[0]} (both are {clash[1]}); choose another output")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a path naming a new temporary file beside ``target``; committed when the block ends
    without an exception (see :class:`AtomicFile`)."""
    with AtomicFile(target) as af:
        yield af.path
        af.commit()


class _FdWriter(io.RawIOBase):
    """Unbuffered writes to our descriptor; a failing write keeps its OSError in the chain of
    whatever the caller's library raises (torch.save turns it into a RuntimeError)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        return os.write(self.fd, data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file object writing the temporary file; committed when the block ends."""
    with AtomicFile(target) as af:
        fh = io.BufferedWriter(_FdWriter(af.fd), buffer_size=1 << 20)
        try:
            yield fh
            fh.flush()
        finally:
            fh.raw.fd = -1  # the descriptor belongs to af; closing the wrapper must not close it
            with contextlib.suppress(Exception):
                fh.close()
        af.commit()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with AtomicFile(target) as af:
        af.write_all(data)
        return af.commit()


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode())


# ---------------------------------------------------------------- appended files, leftovers
def append_open(target: str | os.PathLike) -> io.TextIOWrapper:
    """A line-buffered text file appending to ``target`` (created if absent, with the umask's
    permissions). Never through a symbolic link and never anything but a regular file: a link
    planted at the name (to a user's file) or a FIFO is one OutputError line instead."""
    target = Path(target)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{target}: is a symbolic link; hpc never writes through a link it did not "
                              "create (remove it)") from None
        raise output_error(target, exc) or OutputError(f"{target}: cannot append: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OutputError(f"{target}: not a regular file; hpc appends only to files it created")
    os.set_blocking(fd, True)
    return open(fd, "a", buffering=1, encoding="utf-8")  # one write per line


def _abandoned(path: Path) -> bool:
    """True when ``path`` is a regular file on which no live writer holds AtomicFile's lock (its
    writer died); False when in doubt (a live writer, a link, another user's file, no OFD locks).
    Probed with a write lock, which any writer's read lock refuses; opened for writing to take it
    (nothing is written)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _ofd_lock(fd, fcntl.F_WRLCK):
            return False
        now = os.stat(path, follow_symlinks=False)  # the name still is the file we locked
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files AtomicFile left in ``directory`` (those of the target ``name``
    only, if given) whose writers are gone (killed: ``kill -9``, a node crash); a temporary file
    still being written is kept. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = TMP_NAME.match(entry.name)
        if m and (name is None or m.group("name") == name) and _abandoned(Path(entry.path)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
