"""Atomic file writes (readers see the old file or the new one, never a partial one) and a
directory lock between processes."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
import weakref
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: DirectoryLock does nothing
    fcntl = None  # type: ignore[assignment]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, then
    ``os.replace`` (with the usual permissions, not mkstemp's 0600).

    A symlink is followed (its target is replaced, the link stays); an existing path that is not
    a regular file (``/dev/stdout``, a FIFO, a device) cannot be replaced atomically and is
    written in place instead (replacing it would swap the device for a file)."""
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class DirectoryLockedError(RuntimeError):
    """Another process holds the lock of a directory (see :class:`DirectoryLock`)."""


_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


def _close_held_locks_in_child() -> None:
    """After fork: the child (a DataLoader worker, say) must not keep its parent's locks alive
    after the parent is gone, nor delete the lock file when it exits."""
    for lock in list(_HELD):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class DirectoryLock:
    """An exclusive, non-blocking, re-entrant lock of a directory between processes.

    ``with DirectoryLock(d): ...`` creates ``d/.fastbald.lock`` (holding the owner's pid and
    host), takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on it, and deletes it on release, so an
    unlocked directory holds no lock file. A second holder (another process, or another
    ``DirectoryLock`` of the same directory in this process) gets :class:`DirectoryLockedError`
    at once, naming the owner. The kernel drops the lock when its process dies (``kill -9``
    included), so a stale file never blocks a later run. Nesting ``with`` on one instance is
    allowed. Where ``fcntl`` is missing (Windows) it does nothing.
    """

    NAME = ".fastbald.lock"

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory") -> None:
        self.path = os.path.join(os.fspath(directory), self.NAME)
        self.what = what
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        """Whether this instance holds the lock."""
        return self._depth > 0

    def __enter__(self) -> DirectoryLock:
        if self._depth == 0 and fcntl is not None:
            self._fd = self._acquire()
            _HELD.add(self)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            _HELD.discard(self)
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.unlink(self.path)  # while still locked: nobody can lock this inode after it
            except OSError:
                pass
            os.close(fd)  # releases the flock

    def _acquire(self) -> int:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = os.read(fd, 256).decode(errors="replace").strip() or "another process"
                finally:
                    os.close(fd)
                raise DirectoryLockedError(
                    f"the {self.what} {os.path.dirname(self.path)} is in use by {owner} (lock file "
                    f"{self.path}); wait for it to finish or stop it first"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have unlinked the file between our open and flock: then we
            # locked a deleted inode, and must retry on the path's current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except BaseException:  # a full disk, a signal: do not keep a lock nobody will release
            os.close(fd)
            raise
        return fd
