"""One zarr v2 array of a checkpoint: its `.zarray` metadata checked, its chunk files checked against the grid,
and each chunk read (decoded, size-bounded) on demand. Our own code: see `zarr` for why not the zarr package."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType, by_torch_name
from ..errors import CheckpointError
from ..files.shapes import shape_problem
from ..files.small_files import TEXT_LIMIT, clip, load_json, map_regular, quote, read_small
from .base import Box
from .zarr_codecs import codec_problem, decode, encoded_limit

__all__ = ["CHUNK_NAME", "ZARRAY", "ZarrArray"]

ZARRAY = ".zarray"

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
CHUNK_NAME = re.compile(r"[0-9]+([./][0-9]+)*")
_TYPESTR = re.compile(r"[<>|](b1|[iu][1248]|f[248])")  # zarr v2 type strings of plain numbers: no object, no fields
MAX_EXPANSION = 1024  # encoded chunk: decoded bytes per stored byte, at most
FREE_EXPANSION = 16 * 2**20  # an encoded chunk may always decode to this many bytes


class ZarrArray:
    """One array directory's `.zarray`, checked: what it takes to find, decode and place its chunks."""

    def __init__(self, key: str, path: Path) -> None:
        self.key, self.path = key, path
        meta_file = path / ZARRAY
        meta = load_json(meta_file, TEXT_LIMIT, f"zarr array metadata of {key}")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_file}: zarr array metadata is not a JSON object")

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{meta_file}: {what} (array {key})")

        if meta.get("zarr_format") != 2:
            raise bad(f"zarr_format {quote(meta.get('zarr_format'))}; only zarr v2 arrays are supported")
        shape, chunks = meta.get("shape"), meta.get("chunks")
        if not _int_list(shape, 0) or not _int_list(chunks, 1) or len(shape) != len(chunks):
            raise bad(
                f"shape {quote(shape)} and chunks {quote(chunks)} must be lists of equal length of integers (chunks >= 1)"
            )
        self.dtype, self.stored = _dtype(meta.get("dtype"), bad)
        problem = shape_problem(shape, self.stored.itemsize) or shape_problem(chunks, self.stored.itemsize)
        if problem:
            raise bad(problem)
        self.shape: tuple[int, ...] = tuple(shape)
        self.chunks: tuple[int, ...] = tuple(chunks)
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))
        self.order = meta.get("order", "C")
        if self.order not in ("C", "F"):
            raise bad(f"order {quote(self.order)} is neither C nor F")
        self.separator = meta.get("dimension_separator") or "."
        if self.separator not in (".", "/"):
            raise bad(f"dimension_separator {quote(self.separator)} is neither '.' nor '/'")
        problem = codec_problem(meta.get("compressor"), meta.get("filters"))
        if problem:
            raise bad(problem)
        self.compressor: str | None = meta["compressor"]["id"] if meta.get("compressor") else None
        self.chunk_bytes = math.prod(self.chunks) * self.stored.itemsize

    @property
    def encoded(self) -> bool:
        return self.compressor is not None

    def chunk_name(self, index: tuple[int, ...]) -> str:
        return self.separator.join(map(str, index)) if index else "0"

    def indices(self, box: Box) -> Iterator[tuple[int, ...]]:
        """The grid indices of the chunks that intersect ``box``."""
        ranges = [range(b0 // c, -(-b1 // c)) for (b0, b1), c in zip(box, self.chunks)]
        return product(*ranges)

    def check_files(self) -> None:
        """Every chunk of the grid has its file, of a size that can hold the chunk, and no chunk file lies
        outside the grid. Runs when the reader opens, so a tensor's shape is backed by files before anything
        (a plan, a buffer) is sized from it."""
        present = {}
        for file in self.path.rglob("*") if self.separator == "/" else self.path.iterdir():
            name = file.relative_to(self.path).as_posix()
            if CHUNK_NAME.fullmatch(name) and file.is_file():
                present[name] = file.stat().st_size
        cells = math.prod(self.grid) if 0 not in self.shape else 0
        if cells > max(len(present), 2**16):  # before the grid is enumerated: a forged shape cannot stall us
            raise CheckpointError(
                f"{self.path}: {self.key} {quote(self.shape)} in chunks {quote(self.chunks)} needs {cells} chunk files, "
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
                f"{self.path}: chunk file {outside[0]} lies outside the {quote(self.grid)} chunk grid of "
                f"{self.key} {quote(self.shape)} (chunks {quote(self.chunks)}); the array metadata is inconsistent"
            )
        for name in sorted(expected, key=_natural):
            self._check_size(self.path / name, present[name])

    def _check_size(self, file: Path, size: int) -> None:
        """Raw chunks have exactly the chunk's size; encoded ones may expand at most `MAX_EXPANSION` times
        (or to `FREE_EXPANSION` bytes), so a forged `.zarray` cannot make us allocate more than the files hold,
        and may exceed the chunk's size by no more than a compressor's overhead."""
        if not self.encoded and size != self.chunk_bytes:
            raise CheckpointError(
                f"{file}: chunk file of {self.key} is {size} bytes, expected {self.chunk_bytes} "
                f"({clip('x'.join(map(str, self.chunks)))} x {self.stored.itemsize} bytes; truncated?)"
            )
        if self.encoded and self.chunk_bytes > max(FREE_EXPANSION, MAX_EXPANSION * size):
            raise CheckpointError(
                f"{file}: chunk file of {self.key} is {size} encoded bytes for a {self.chunk_bytes}-byte chunk; "
                f"more than {MAX_EXPANSION}x expansion is refused"
            )
        if self.encoded and size > encoded_limit(self.chunk_bytes):
            raise CheckpointError(
                f"{file}: chunk file of {self.key} is {size} encoded bytes, more than a {self.compressor} "
                f"stream of its {self.chunk_bytes}-byte chunk can take"
            )

    def chunk(self, index: tuple[int, ...]) -> np.ndarray:
        """The whole chunk at grid ``index`` (edge chunks too are stored at full chunk size)."""
        file = self.path / self.chunk_name(index)
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{file}: chunk file of {self.key} cannot be read ({exc})") from exc
        self._check_size(file, size)
        what = f"chunk file of {self.key}"
        if self.compressor is None:
            # A map: only the pages the box needs are read, so memory stays bounded by the box.
            data: Any = map_regular(file, what)
            if len(data) != self.chunk_bytes:  # replaced since it was listed
                raise CheckpointError(f"{file}: {what} is {len(data)} bytes, expected {self.chunk_bytes}")
        else:
            encoded = read_small(file, encoded_limit(self.chunk_bytes), what)
            try:
                data = decode(encoded, self.compressor, self.chunk_bytes)
            except ValueError as exc:
                raise CheckpointError(f"{file}: {what} cannot be decoded as {self.compressor}: {exc}") from exc
        return np.frombuffer(data, dtype=self.stored).reshape(self.chunks, order=self.order)


def _int_list(value: Any, minimum: int) -> bool:
    return isinstance(value, list) and all(type(n) is int and n >= minimum for n in value)


def _dtype(text: Any, bad: Any) -> tuple[DType, np.dtype]:
    """(our dtype, the numpy dtype of the stored bytes) for a zarr v2 dtype string. Only plain numbers are
    parsed at all: an object (`|O`) or structured dtype is refused before numpy sees the text."""
    if text == "bfloat16":  # written by Megatron through tensorstore / ml_dtypes: little-endian bf16 bits
        return by_torch_name("bfloat16"), np.dtype("<u2")  # type: ignore[return-value]
    stored = np.dtype(text) if isinstance(text, str) and _TYPESTR.fullmatch(text) else None
    name = _NUMPY_KINDS.get((stored.kind, stored.itemsize)) if stored is not None else None
    dtype = by_torch_name(name) if name else None
    if stored is None or dtype is None:
        raise bad(f"unsupported dtype {quote(text)}")
    return dtype, stored


def _natural(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.split(r"[./]", name))
