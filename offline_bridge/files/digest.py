"""sha256 of a whole file, streamed block by block: hashlib does the hashing (it releases the GIL on large
blocks, so several files hash in parallel on threads); our part is opening only regular files (`small_files`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import CheckpointError
from .small_files import open_regular

__all__ = ["sha256_file"]

_BLOCK = 1 << 24


def sha256_file(path: str | Path, limit: int | None = None, what: str = "file") -> str:
    """sha256 of a regular file read block by block (a FIFO or device is an error, never opened blocking);
    with ``limit``, a larger file is an error before a byte is read."""
    fd = open_regular(path, what)
    try:
        if limit is not None and os.fstat(fd).st_size > limit:
            raise CheckpointError(f"{path}: the {what} is larger than the {limit} bytes such a file may take")
        digest = hashlib.sha256()
        while block := os.read(fd, _BLOCK):
            digest.update(block)
        return digest.hexdigest()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    finally:
        os.close(fd)
