"""Raw positional I/O on file descriptors: scattered reads, gathered writes, kernel copies, all retried when short.
Our own code: the standard library has the calls, no library their retries and bounded batches.

The writer puts bytes at planned offsets from several threads, which needs
`os.preadv`/`os.pwritev`/`os.copy_file_range` on shared descriptors (no file position), in bounded batches.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ..errors import CheckpointError

__all__ = ["copy_range", "open_readonly", "pread_all", "pwrite_all", "start_writeback"]

# bytes per write call: writing tens of MB into a file's page cache in one call took 4x the CPU of 1 MB calls
# (measured on Linux 6.18, ext4, in a VM; copy_file_range and reads showed no such effect)
_WRITE_CHUNK = 2**20
_IOV_MAX = 1024  # buffers per readv/writev call (POSIX minimum of IOV_MAX)


def open_readonly(path: str) -> int:
    """A checkpoint file opened for reading; a failure names the file."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open shard file ({exc})") from exc


def copy_range(source: int, out: int, length: int, src: int, dst: int, path: str) -> None:
    """``length`` bytes from ``src`` in ``source`` to ``dst`` in ``out``, in the kernel when it can."""
    while length:
        try:
            done = os.copy_file_range(source, out, length, src, dst)
        except (AttributeError, OSError) as exc:  # no copy_file_range here, or not between these files
            if isinstance(exc, OSError) and exc.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
            ):
                raise
            data = memoryview(bytearray(min(length, 64 * 2**20)))
            pread_all(source, [data], src, path)
            pwrite_all(out, [data], dst)
            done = len(data)
        if not done:
            raise CheckpointError(f"{path}: ends before byte {src + length} (truncated?)")
        length, src, dst = length - done, src + done, dst + done


def pread_all(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` from consecutive bytes of ``fd`` at ``offset`` (scattered read, retried when short)."""
    for first in range(0, len(views), _IOV_MAX):
        batch = views[first : first + _IOV_MAX]
        while batch:
            got = os.preadv(fd, batch, offset)
            if not got:
                raise CheckpointError(f"{path}: ends before byte {offset + sum(len(v) for v in batch)} (truncated?)")
            offset += got
            batch = _advance(batch, got)


def pwrite_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write ``views`` one after the other at ``offset`` (gathered writes, retried when short), at most
    `_WRITE_CHUNK` bytes a call."""
    pieces = [view[at : at + _WRITE_CHUNK] for view in views for at in range(0, len(view), _WRITE_CHUNK)]
    first = 0
    while first < len(pieces):
        size, stop = len(pieces[first]), first + 1
        while stop < len(pieces) and stop - first < _IOV_MAX and size + len(pieces[stop]) <= _WRITE_CHUNK:
            size += len(pieces[stop])
            stop += 1
        batch, first = pieces[first:stop], stop
        while batch:
            done = os.pwritev(fd, batch, offset)
            offset += done
            batch = _advance(batch, done)


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``done`` bytes went through."""
    first = 0
    while first < len(views) and done >= len(views[first]):
        done -= len(views[first])
        first += 1
    rest = views[first:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing the tensor to disk now, so the fsync at the end of the file has little left to wait for
    (and a converted checkpoint does not crowd the page cache)."""
    if hasattr(os, "posix_fadvise") and nbytes:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
