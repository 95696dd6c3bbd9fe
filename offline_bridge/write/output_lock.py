"""The lock of one OUT_DIR: `fcntl.flock` on a lock file beside it, so a second run into the same OUT_DIR
fails at once, naming the first one's pid, instead of both succeeding and the later silently replacing the
earlier. Our own code: the standard library has the primitive, and the lock file must be removed safely.

The holder removes the file while still holding it; a run that locked the file just before it was removed
sees it gone (another inode at the path, or none) and locks the new one. A killed run's file stays, unlocked,
and the next run takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from ..errors import OptionError

__all__ = ["OutputLock"]

_ATTEMPTS = 100


class OutputLock:
    """Held from `acquire` until `release`; ``path`` is the lock file, ``out`` the OUT_DIR it guards."""

    def __init__(self, path: Path, out: Path) -> None:
        self.path, self.out = path, out
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(_ATTEMPTS):  # another run removed the file we locked: lock the new one
            fd = self._open()
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    raise OptionError(
                        f"{self.out}: another run (pid {holder}) is writing this OUT_DIR; wait for it or choose another"
                    ) from None
                if _same_file(fd, self.path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OptionError(f"{self.path}: the lock file of OUT_DIR keeps being replaced")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held (see the module docstring)
        os.close(self._fd)
        self._fd = None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise OptionError(f"{self.path}: cannot create the lock file of OUT_DIR ({exc.strerror})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OptionError(f"{self.path}: the lock file of OUT_DIR is not a regular file")
        return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
