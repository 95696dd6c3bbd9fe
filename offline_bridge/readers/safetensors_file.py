"""Read safetensors files someone else may have written or edited (`diff`, `verify`).

Our own reader, because the `safetensors` library loads a tensor whole (a `diff` compares block by block and
`verify` hashes block by block, in bounded memory) and has no bf16 without torch; and our own header checks
first, each failing with a message naming the file and the tensor. The library then parses the header too
(`safe_open`, which reads only the header), through the descriptor we mapped, never the path again: it adds
the format's rule that the tensors cover the data buffer exactly (no gap, nothing after the last one), and a
file it accepts is one transformers loads.

The file must be a regular file (a FIFO or device is refused, never opened blocking). The header is checked
before anything is allocated from it: its length against the file and a cap, no key twice, every entry's
dtype, shape (one numpy can represent) and byte range against the data buffer (in bounds, the size the shape
needs, no overlaps). Tensor bytes are then views of a read-only map; nothing is copied until compared.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from ..dtypes import DTYPES, DType
from ..errors import CheckpointError
from ..files.shapes import shape_problem
from ..files.small_files import clip, map_descriptor, open_regular, quote
from .pickles.torch_save import release_pages

__all__ = ["MAX_HEADER", "SafetensorsFile", "StEntry"]

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_BY_CODE = {d.safetensors: d for d in DTYPES}
_HASH_BLOCK = 64 * 2**20
_FD_DIR = "/dev/fd"  # an open descriptor's file by name (Linux, macOS): the same file, not the path again


@dataclass(frozen=True)
class StEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One safetensors file, its header validated; ``tensors`` by name in data order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = open_regular(self.path, "safetensors file")
        try:
            self._buf = map_descriptor(fd, self.path, "safetensors file")
            self._check_header()
            _library_check(fd, self.path)
        finally:
            os.close(fd)

    def _check_header(self) -> None:
        size = len(self._buf)
        if size < 8:
            raise CheckpointError(f"{self.path}: {size} bytes, too short for a safetensors header")
        length = int.from_bytes(self._buf[:8], "little")
        if length > min(MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{self.path}: header length {length} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit"
            )
        self.header_size = 8 + length
        try:
            header = json.loads(bytes(self._buf[8 : self.header_size]).decode("utf-8"), object_pairs_hook=_no_repeats)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: header is not UTF-8 JSON ({clip(str(exc))})") from exc
        except RecursionError:
            raise CheckpointError(f"{self.path}: header nests too deeply to be a safetensors header") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        entries = [self._entry(name, value, size) for name, value in header.items()]
        entries.sort(key=lambda e: (e.begin, e.end))
        for before, after in itertools.pairwise(entries):
            if after.begin < before.end:
                raise CheckpointError(f"{self.path}: tensors {before.name} and {after.name} overlap")
        self.tensors: dict[str, StEntry] = {e.name: e for e in entries}

    def _entry(self, name: str, value: Any, size: int) -> StEntry:
        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: tensor {quote(name)}: {what}")

        if not isinstance(value, dict):
            raise bad("header entry is not an object")
        code = value.get("dtype")
        dtype = _BY_CODE.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise bad(f"unsupported dtype {quote(code)}")
        shape, offsets = value.get("shape"), value.get("data_offsets")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise bad(
                f"shape {quote(shape)} / data_offsets {quote(offsets)} are not non-negative integers [begin <= end]"
            )
        problem = shape_problem(shape, dtype.itemsize)
        if problem:
            raise bad(problem)
        begin, end = self.header_size + offsets[0], self.header_size + offsets[1]
        if end > size:
            raise bad(f"bytes [{begin}, {end}) run past the end of the file ({size} bytes; truncated?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"{end - begin} bytes do not hold shape {shape} of {dtype.safetensors}")
        return StEntry(name, dtype, tuple(shape), begin, end)

    def header(self) -> bytes:
        """The length prefix and the JSON header, as stored."""
        return bytes(self._buf[: self.header_size])

    def raw(self, name: str) -> memoryview:
        entry = self.tensors[name]
        return memoryview(self._buf)[entry.begin : entry.end]

    def sha256(self, name: str) -> str:
        """The tensor's sha256, read block by block; pages are unmapped once hashed, so memory stays one block
        whatever the file size (the page cache keeps them)."""
        entry, digest = self.tensors[name], hashlib.sha256()
        for start in range(entry.begin, entry.end, _HASH_BLOCK):
            stop = min(start + _HASH_BLOCK, entry.end)
            digest.update(memoryview(self._buf)[start:stop])
            if isinstance(self._buf, mmap.mmap):
                release_pages(self._buf, start, stop - start)
        return digest.hexdigest()

    def array(self, name: str) -> np.ndarray:
        """A read-only view of the tensor (bf16 as uint16, as everywhere in offline-bridge)."""
        entry = self.tensors[name]
        return np.frombuffer(self.raw(name), dtype=entry.dtype.np).reshape(entry.shape)

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            try:
                self._buf.close()
            except BufferError:  # a view is still referenced; collected later
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _library_check(fd: int, path: Path) -> None:
    """The `safetensors` library's parse of the header of the file open as ``fd``; its refusal is ours. Without
    a `/dev/fd` (no procfs) only our own checks apply."""
    if not os.path.isdir(_FD_DIR):
        return
    try:
        with safe_open(f"{_FD_DIR}/{fd}", framework="numpy"):
            pass
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: the safetensors library refuses the file ({clip(str(exc))})") from exc


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: the safetensors format disallows a key twice, so do we."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {quote(key)} appears twice")
        found[key] = value
    return found


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)
