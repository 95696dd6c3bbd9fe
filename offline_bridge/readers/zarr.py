"""Megatron's zarr format (megatron-core 0.9 to 0.15), read without megatron, torch or torch.distributed.

Every ShardedTensor key is a zarr v2 array directory: `.zarray` (JSON) gives the global shape, the chunk
grid and the dtype; each chunk is a file `i.j.k` holding raw C-order bytes (or bytes encoded by a numcodecs
codec). bfloat16, dtype text `bfloat16`, is something zarr itself cannot describe: its raw bits are carried
as uint16, as everywhere else in offline-bridge. We read chunk files ourselves because a missing one must be
an error: zarr would hand back `fill_value` (or, with `fill_value: null`, uninitialised memory) instead.
See formats/zarr.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType, by_torch_name
from ..errors import CheckpointError
from .base import Box, CheckpointReader, TensorInfo, full_box, load_common_pt

__all__ = ["ZarrReader"]

ZARRAY = ".zarray"
# zarr v2 numpy type strings (kind + item size, byte order aside) -> our dtype names; "bfloat16" is special.
_NUMPY_KINDS = {
    ("f", 4): "float32",
    ("f", 2): "float16",
    ("f", 8): "float64",
    ("i", 8): "int64",
    ("i", 4): "int32",
    ("i", 2): "int16",
    ("i", 1): "int8",
    ("u", 1): "uint8",
    ("b", 1): "bool",
}
_CHUNK_NAME = re.compile(r"^\d+([./]\d+)*$")
MAX_EXPANSION = 1024  # encoded chunk: decoded bytes per stored byte, at most
FREE_EXPANSION = 16 * 2**20  # an encoded chunk may always decode to this many bytes


class _Array:
    """One array directory's `.zarray`, checked: what it takes to find, decode and place its chunks."""

    def __init__(self, key: str, path: Path) -> None:
        self.key, self.path = key, path
        meta_file = path / ZARRAY
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{meta_file}: unreadable zarr array metadata ({exc})") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_file}: zarr array metadata is not a JSON object")

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{meta_file}: {what} (array {key})")

        if meta.get("zarr_format") != 2:
            raise bad(f"zarr_format {meta.get('zarr_format')!r}; only zarr v2 arrays are supported")
        shape, chunks = meta.get("shape"), meta.get("chunks")
        if not _int_list(shape, 0) or not _int_list(chunks, 1) or len(shape) != len(chunks):
            raise bad(f"shape {shape!r} and chunks {chunks!r} must be lists of equal length of integers (chunks >= 1)")
        self.shape: tuple[int, ...] = tuple(shape)
        self.chunks: tuple[int, ...] = tuple(chunks)
        self.grid = tuple(math.ceil(n / c) for n, c in zip(self.shape, self.chunks))
        self.dtype, self.stored = _dtype(meta.get("dtype"), bad)
        self.order = meta.get("order", "C")
        if self.order not in ("C", "F"):
            raise bad(f"order {self.order!r} is neither C nor F")
        self.separator = meta.get("dimension_separator") or "."
        if self.separator not in (".", "/"):
            raise bad(f"dimension_separator {self.separator!r} is neither '.' nor '/'")
        self.compressor = meta.get("compressor")
        self.filters = meta.get("filters") or []
        if not isinstance(self.filters, list):
            raise bad(f"filters {self.filters!r} is not a list")
        codecs = ([self.compressor] if self.compressor is not None else []) + self.filters
        if any(not isinstance(c, dict) or not isinstance(c.get("id"), str) for c in codecs):
            raise bad(f"codec configurations {codecs!r} need an 'id'")
        self.chunk_bytes = math.prod(self.chunks) * self.stored.itemsize
        self.checked = False

    @property
    def encoded(self) -> bool:
        return self.compressor is not None or bool(self.filters)

    def chunk_name(self, index: tuple[int, ...]) -> str:
        return self.separator.join(map(str, index)) if index else "0"

    def indices(self, box: Box) -> Iterator[tuple[int, ...]]:
        """The grid indices of the chunks that intersect ``box``."""
        ranges = [range(b0 // c, -(-b1 // c)) for (b0, b1), c in zip(box, self.chunks)]
        return product(*ranges)

    def check_files(self) -> None:
        """Every chunk of the grid has its file, of a size that can hold the chunk, and no chunk file lies
        outside the grid. Runs before anything is allocated for the array."""
        present = {}
        for file in self.path.rglob("*") if self.separator == "/" else self.path.iterdir():
            name = file.relative_to(self.path).as_posix()
            if _CHUNK_NAME.match(name) and file.is_file():
                present[name] = file.stat().st_size
        cells = math.prod(self.grid) if 0 not in self.shape else 0
        if cells > max(len(present), 2**16):  # before the grid is enumerated: a forged shape cannot stall us
            raise CheckpointError(
                f"{self.path}: {self.key} {self.shape} in chunks {self.chunks} needs {cells} chunk files, "
                f"{len(present)} are present; a zarr reader would fill the rest with fill_value, so it is refused"
            )
        expected = {self.chunk_name(i) for i in product(*map(range, self.grid))} if cells else set()
        missing = sorted(expected - present.keys(), key=_natural)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{self.path}: chunk file {missing[0]}{more} of {self.key} is missing; a zarr reader would "
                f"silently fill it with fill_value, so the checkpoint is refused"
            )
        outside = sorted(present.keys() - expected, key=_natural)
        if outside:
            raise CheckpointError(
                f"{self.path}: chunk file {outside[0]} lies outside the {'x'.join(map(str, self.grid))} chunk grid of "
                f"{self.key} {self.shape} (chunks {self.chunks}); the array metadata is inconsistent"
            )
        for name in sorted(expected, key=_natural):
            self._check_size(self.path / name, present[name])
        self.checked = True

    def _check_size(self, file: Path, size: int) -> None:
        """Raw chunks have exactly the chunk's size; encoded ones may expand at most `MAX_EXPANSION` times
        (or to `FREE_EXPANSION` bytes), so a forged `.zarray` or a decompression bomb cannot make us allocate."""
        if not self.encoded and size != self.chunk_bytes:
            raise CheckpointError(
                f"{file}: chunk file of {self.key} is {size} bytes, expected {self.chunk_bytes} "
                f"({'x'.join(map(str, self.chunks))} x {self.stored.itemsize} bytes; truncated?)"
            )
        if self.encoded and self.chunk_bytes > max(FREE_EXPANSION, MAX_EXPANSION * size):
            raise CheckpointError(
                f"{file}: chunk file of {self.key} is {size} encoded bytes for a {self.chunk_bytes}-byte chunk; "
                f"more than {MAX_EXPANSION}x expansion is refused"
            )

    def chunk(self, index: tuple[int, ...]) -> np.ndarray:
        """The whole chunk at grid ``index`` (edge chunks too are stored at full chunk size)."""
        file = self.path / self.chunk_name(index)
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{file}: chunk file of {self.key} cannot be read ({exc})") from exc
        self._check_size(file, size)
        if not self.encoded:
            if self.chunk_bytes == 0:
                return np.empty(self.chunks, dtype=self.stored)
            # A map: only the pages the box needs are read, so memory stays bounded by the box.
            return np.memmap(file, dtype=self.stored, mode="r", shape=self.chunks, order=self.order)
        raw = self._decode(file)
        if raw.nbytes != self.chunk_bytes:
            raise CheckpointError(
                f"{file}: chunk file of {self.key} decodes to {raw.nbytes} bytes, expected {self.chunk_bytes}"
            )
        return np.frombuffer(raw, dtype=self.stored).reshape(self.chunks, order=self.order)

    def _decode(self, file: Path) -> np.ndarray:
        """Undo the compressor, then the filters in reverse order (zarr v2's encoding pipeline)."""
        from numcodecs import get_codec  # zarr's own codec registry; only for encoded chunks
        from numcodecs.compat import ensure_contiguous_ndarray

        try:
            data: Any = file.read_bytes()
            if self.compressor is not None:
                data = get_codec(dict(self.compressor)).decode(data)
            for config in reversed(self.filters):
                data = get_codec(dict(config)).decode(data)
            return ensure_contiguous_ndarray(data).view(np.uint8).reshape(-1)
        except CheckpointError:
            raise
        except Exception as exc:  # a codec's own error: corrupt data or an unknown codec id
            raise CheckpointError(f"{file}: chunk file of {self.key} cannot be decoded ({exc})") from exc


class ZarrReader(CheckpointReader):
    """Reader of a zarr iteration directory (`metadata.json`, one array directory per key, `common.pt`)."""

    format = "zarr"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        marker = self.path / "metadata.json"
        try:
            backend = json.loads(marker.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{marker}: unreadable ({exc})") from exc
        if backend != "zarr":
            raise CheckpointError(f"{marker}: sharded_backend is {backend!r}, not zarr")
        self._arrays: dict[str, _Array] = {}
        self._tensors: dict[str, TensorInfo] = {}
        self.objects: list[str] = []  # ShardedObject directories (`<key>/shard_*.pt`), never read
        for child in sorted(self.path.iterdir(), key=lambda p: p.name):
            if not child.is_dir() or child.suffix == ".sync":  # zarr ProcessSynchronizer lock directories
                continue
            if (child / ZARRAY).is_file():
                array = _Array(child.name, child)
                self._arrays[child.name] = array
                self._tensors[child.name] = TensorInfo(child.name, array.shape, array.dtype)
            elif any(_CHUNK_NAME.match(p.name) for p in child.iterdir()):
                raise CheckpointError(f"{child}: holds zarr chunk files but no {ZARRAY}; the array metadata is missing")
            else:
                self.objects.append(child.name)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @cached_property
    def common_state(self) -> dict[str, Any]:
        """Megatron's non-sharded state, `common.pt`, through the allow-list unpickler."""
        return load_common_pt(self.path) or {}

    def chunk_boxes(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        array = self._arrays[key]
        if not array.checked:
            array.check_files()
        return [
            (tuple(i * c for i, c in zip(index, array.chunks)), array.chunks)
            for index in array.indices(full_box(array.shape))
        ]

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        array = self._arrays.get(key)
        if array is None:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in the checkpoint")
        if not array.checked:
            array.check_files()
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


def _int_list(value: Any, minimum: int) -> bool:
    return isinstance(value, list) and all(type(n) is int and n >= minimum for n in value)


def _dtype(text: Any, bad: Any) -> tuple[DType, np.dtype]:
    """(our dtype, the numpy dtype of the stored bytes) for a zarr v2 dtype string."""
    if text == "bfloat16":  # written by Megatron through tensorstore / ml_dtypes: little-endian bf16 bits
        return by_torch_name("bfloat16"), np.dtype("<u2")  # type: ignore[return-value]
    try:
        if not isinstance(text, str):
            raise TypeError("not a string")
        stored = np.dtype(text)
    except TypeError as exc:
        raise bad(f"dtype {text!r} is not a zarr v2 type string ({exc})") from exc
    name = _NUMPY_KINDS.get((stored.kind, stored.itemsize))
    dtype = by_torch_name(name) if name else None
    if dtype is None or stored.fields is not None or stored.subdtype is not None:
        raise bad(f"unsupported dtype {text!r}")
    return dtype, stored


def _natural(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.split(r"[./]", name))
