"""Megatron's zarr format (megatron-core 0.9 to 0.15), read without megatron, torch or torch.distributed, and
without the zarr package (a missing chunk must be an error, not `fill_value`; its codec registry builds any
codec a `.zarray` names): the chunk reader is our own, for both reasons given below.

Every ShardedTensor key is a zarr v2 array directory: `.zarray` (JSON) gives the global shape, the chunk
grid and the dtype; each chunk is a file `i.j.k` holding raw C-order bytes (or bytes encoded by a numcodecs
codec). bfloat16, dtype text `bfloat16`, is something zarr itself cannot describe: its raw bits are carried
as uint16, as everywhere else in offline-bridge. We read chunk files ourselves because a missing one must be
an error: zarr would hand back `fill_value` (or, with `fill_value: null`, uninitialised memory) instead, and
because its codec registry would build any codec a `.zarray` names, some of which unpickle: encoded chunks go
through `zarr_codecs` (an allow-list; the standard library's zlib for zlib and gzip, numcodecs' bindings for
zstd and blosc, each bounded by the chunk's size before it decodes). See formats/zarr.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..files.small_files import quote
from .base import Box, CheckpointReader, TensorInfo, full_box, load_common_pt
from .marker import MARKER, read_marker
from .zarr_array import CHUNK_NAME, ZARRAY, ZarrArray

__all__ = ["ZarrReader"]


class ZarrReader(CheckpointReader):
    """Reader of a zarr iteration directory (`metadata.json`, one array directory per key, `common.pt`)."""

    format = "zarr"

    def __init__(self, path: Path, *, defer_problems: bool = False) -> None:
        """Every array's metadata, codecs and chunk files are checked here: the first problem is raised, or,
        with ``defer_problems`` (`inspect`), every problem is kept for `validate` and its array left out."""
        self.path = Path(path)
        backend = (read_marker(self.path) or {}).get("sharded_backend")
        if backend != "zarr":
            raise CheckpointError(f"{self.path / MARKER}: sharded_backend is {quote(backend)}, not zarr")
        self._arrays: dict[str, ZarrArray] = {}
        self._tensors: dict[str, TensorInfo] = {}
        self._problems: list[str] = []
        self.objects: list[str] = []  # ShardedObject directories (`<key>/shard_*.pt`), never read
        for child in sorted(self.path.iterdir(), key=lambda p: p.name):
            if not child.is_dir() or child.suffix == ".sync":  # zarr ProcessSynchronizer lock directories
                continue
            try:
                self._add(child)
            except CheckpointError as exc:
                if not defer_problems:
                    raise
                self._problems.append(str(exc))

    def _add(self, child: Path) -> None:
        if os.path.lexists(child / ZARRAY):  # a FIFO or directory there is refused when read
            array = ZarrArray(child.name, child)
            array.check_files()
            self._arrays[child.name] = array
            self._tensors[child.name] = TensorInfo(child.name, array.shape, array.dtype)
        elif any(CHUNK_NAME.fullmatch(p.name) for p in child.iterdir()):
            raise CheckpointError(f"{child}: holds zarr chunk files but no {ZARRAY}; the array metadata is missing")
        else:
            self.objects.append(child.name)

    def validate(self) -> list[str]:
        """What opening refused, one line per array (empty unless opened with ``defer_problems``)."""
        return list(self._problems)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @cached_property
    def common_state(self) -> dict[str, Any]:
        """Megatron's non-sharded state, `common.pt`, through the allow-list unpickler."""
        return load_common_pt(self.path) or {}

    def chunk_boxes(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        array = self._arrays[key]
        return [
            (tuple(i * c for i, c in zip(index, array.chunks)), array.chunks)
            for index in array.indices(full_box(array.shape))
        ]

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        array = self._arrays.get(key)
        if array is None:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in the checkpoint")
        box = box or full_box(array.shape)
        if len(box) != len(array.shape) or any(not 0 <= b0 <= b1 <= n for (b0, b1), n in zip(box, array.shape)):
            raise CheckpointError(f"{array.path}: box {box} lies outside {key} {array.shape}")
        out = np.empty([b1 - b0 for b0, b1 in box], dtype=array.dtype.np)
        if out.size == 0:
            return out
        for index in array.indices(box):
            origin = [i * c for i, c in zip(index, array.chunks)]
            overlap = [(max(o, b0), min(o + c, b1)) for o, c, (b0, b1) in zip(origin, array.chunks, box)]
            src = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(overlap, origin))
            dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(overlap, box))
            chunk = array.chunk(index)
            out[dst] = chunk[src]  # also turns a big-endian stored dtype into the little-endian one
            del chunk
        return out
