"""Opening files a checkpoint, a config or a manifest names: regular files only, small ones read under a limit.

A path in a checkpoint directory may be a FIFO (opening it blocks forever), a device (`/dev/zero` never
ends) or a sparse file of terabytes. Everything we open goes through here: opened non-blocking, checked to
be a regular file with `fstat` on the open descriptor (no race with a swapped path), and files read whole
are refused above a size limit before a byte is read. Our own code because no library offers the check on
the descriptor. What an error message quotes of a file's content goes through `clip` / `quote` (80
characters), so a 512 MB line in a file never becomes a 512 MB error line.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "JSON_LIMIT",
    "METADATA_LIMIT",
    "TEXT_LIMIT",
    "clip",
    "load_json",
    "map_descriptor",
    "map_regular",
    "open_regular",
    "quote",
    "read_small",
    "read_small_text",
]

TEXT_LIMIT = 1 << 16  # tracker files, markers: a few bytes in practice
JSON_LIMIT = 64 << 20  # config.json, metadata.json, manifests, run_config.yaml
METADATA_LIMIT = 1 << 30  # `.metadata` / `common.pt`: further bounded by the files they describe
QUOTE_LIMIT = 80  # characters of file content an error message may quote


def open_regular(path: str | Path, what: str = "file", error: type[Exception] = CheckpointError) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot open the {what} ({exc.strerror})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: the {what} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | Path, limit: int, what: str = "file", error: type[Exception] = CheckpointError) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (checked before reading)."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: the {what} is {size} bytes, more than the {limit} such a file can take")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # grew while we read
            raise error(f"{path}: the {what} grew past {limit} bytes while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    finally:
        os.close(fd)


def read_small_text(path: str | Path, limit: int, what: str = "file", error: type[Exception] = CheckpointError) -> str:
    """``read_small`` decoded as UTF-8; undecodable bytes are an error naming the file."""
    data = read_small(path, limit, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from exc


def load_json(path: str | Path, limit: int, what: str = "file", error: type[Exception] = CheckpointError) -> Any:
    """The JSON value of a small UTF-8 file; bad JSON (too deep a nesting too) is an error naming the file."""
    text = read_small_text(path, limit, what, error)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: the {what} is not JSON ({clip(str(exc))})") from exc
    except RecursionError:
        raise error(f"{path}: the {what} nests too deeply to be JSON we read") from None


def map_regular(path: str | Path, what: str = "file", error: type[Exception] = CheckpointError) -> mmap.mmap | bytes:
    """A read-only map of the regular file ``path`` (``b""`` when it is empty: an empty file cannot be mapped)."""
    fd = open_regular(path, what, error)
    try:
        return map_descriptor(fd, path, what, error)
    finally:
        os.close(fd)


def map_descriptor(
    fd: int, path: str | Path, what: str = "file", error: type[Exception] = CheckpointError
) -> mmap.mmap | bytes:
    """A read-only map of ``fd``, a regular file from `open_regular` named ``path`` (``b""`` when empty)."""
    try:
        if os.fstat(fd).st_size == 0:
            return b""
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot map the {what} ({exc})") from exc


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters: what an error message may echo of a file's content."""
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, clipped; a value too big to print (an int of 5000 digits) is named by its type."""
    try:
        return clip(repr(value), limit)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
