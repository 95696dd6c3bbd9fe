"""The safetensors files being written: headers first, each tensor put at its planned offset and hashed, each
file flushed to disk (fsync) once complete. Kept apart from the step scheduling that feeds it. Our own writer,
not `safetensors.save_file`, which takes every tensor of a file in memory at once and writes it in one go;
here tensors arrive from several threads (or are copied file to file by the kernel) in bounded memory."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

from ..files.handles import HandleCache
from ..files.posix_io import copy_range, pread_all, pwrite_all, start_writeback
from ..plan.schema import Plan, Target
from ..plan.transfer import Run
from .completed import record_done

__all__ = ["MAX_OPEN_FILES", "OutputFiles"]

MAX_OPEN_FILES = 32  # output files and checkpoint files each kept open at once
_HASH_BLOCK = 16 * 2**20  # bytes read back at a time to hash a written tensor (per thread)


class OutputFiles:
    """The plan's safetensors files named in ``files``: headers written first, tensors put at their offsets by any thread; each
    file is flushed to disk (fsync) and closed as soon as its last tensor is in.

    Every tensor is hashed as it is put in place, on the thread that writes it, so hashing overlaps the other
    threads' copies and the disk's writeback: from memory when written from memory, else read back from the
    page cache. ``digests`` holds the sha256 of the bytes `verify` will read; with ``record``, each complete file
    is recorded (`completed.record_done`) for `--resume`."""

    def __init__(
        self, out_dir: Path, plan: Plan, files: Collection[str], record: bool, limit: int = MAX_OPEN_FILES
    ) -> None:
        self._dir, self._record = out_dir, record
        self._fds: HandleCache[str, int] = HandleCache(self._open, os.close, limit)
        self._plans = {file.name: file for file in plan.files if file.name in files}
        self._left = Counter(t.file for t in plan.targets() if t.file in self._plans)
        self._lock = threading.Lock()
        self._scratch = threading.local()
        self.digests: dict[str, dict[str, str]] = {name: {} for name in self._plans}  # file -> tensor -> sha256
        for file in self._plans.values():
            fd = os.open(out_dir / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pwrite_all(fd, [memoryview(file.header)], 0)
                os.ftruncate(fd, file.size)
            finally:
                os.close(fd)
            if not self._left[file.name]:
                self._flush(file.name)

    def _open(self, name: str) -> int:
        return os.open(self._dir / name, os.O_RDWR)  # read too: tensors are hashed from the file

    def write(self, target: Target, blocks: Sequence[memoryview]) -> None:
        """Put ``target``'s bytes (the concatenation of ``blocks``) in place."""
        with self._fds.use(target.file) as fd:
            pwrite_all(fd, blocks, target.offset)
            digest = hashlib.sha256()
            for block in blocks:
                digest.update(block)
            start_writeback(fd, target.offset, target.nbytes)
        self._done(target, digest.hexdigest())

    def copy(self, target: Target, runs: Sequence[Run], sources: HandleCache[str, int]) -> None:
        """Put ``target``'s bytes in place straight from the checkpoint files (contiguous runs only)."""
        with self._fds.use(target.file) as fd:
            for run in runs:
                with sources.use(run.path) as source:
                    copy_range(source, fd, run.length, run.src, target.offset + run.dst, run.path)
            digest = self._read_back_hash(fd, target)
            start_writeback(fd, target.offset, target.nbytes)
        self._done(target, digest)

    def _read_back_hash(self, fd: int, target: Target) -> str:
        """The sha256 of a tensor copied file to file, read back (from the page cache) on this thread."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None:
            buffer = self._scratch.buffer = memoryview(bytearray(_HASH_BLOCK))
        digest = hashlib.sha256()
        for start in range(target.offset, target.offset + target.nbytes, _HASH_BLOCK):
            block = buffer[: min(_HASH_BLOCK, target.offset + target.nbytes - start)]
            pread_all(fd, [block], start, str(self._dir / target.file))
            digest.update(block)
        return digest.hexdigest()

    def _done(self, target: Target, digest: str) -> None:
        with self._lock:
            self.digests[target.file][target.name] = digest
            self._left[target.file] -= 1
            complete = not self._left[target.file]
        if complete:
            self._flush(target.file)

    def _flush(self, name: str) -> None:
        fd = self._fds.pop(name)
        fd = self._open(name) if fd is None else fd
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._record:
            record_done(self._dir, self._plans[name], self.digests[name])

    def close(self) -> None:
        self._fds.close()
