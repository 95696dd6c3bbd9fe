"""Megatron's torch_dist format (PyTorch DCP + Megatron's common state), read without torch.distributed. Our
own reader, not DCP's or Megatron's loaders: those need torch, unpickle `.metadata` and chunk records with the
full unpickler (a checkpoint could run code) and load a whole state dict (memory as large as the model); here
every pickle goes through the allow-list and a tensor's chunks are read one tensor at a time.

`.metadata` gives every tensor's global shape and chunks, and where each chunk's `torch.save` record sits
in a `.distcp` file. Each record is parsed once (through a memory map); then `extents` tells where the
chunk's bytes lie, or `read` copies them once, from the map into the assembled tensor, and unmaps them.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..files.handles import HandleCache
from ..files.small_files import map_regular
from .base import Box, CheckpointReader, Extent, TensorInfo, full_box, is_model_key, load_common_pt
from .coverage import check_tiling
from .dcp_metadata import Catalog, read_catalog
from .pickles.safe_pickle import TensorRef
from .pickles.tensor_records import check_chunk_record
from .pickles.torch_save import TorchArchive, is_contiguous, release_pages, view

__all__ = ["MAX_OPEN_FILES", "TorchDistReader"]

MAX_OPEN_FILES = 64  # shard files mapped at once (a big checkpoint has thousands)


class TorchDistReader(CheckpointReader):
    """Reader of a torch_dist iteration directory (`.metadata`, `__*_*.distcp`, `common.pt`); with
    ``check_crc``, each record's tensor bytes are compared with their zip CRC-32 when first located."""

    def __init__(self, path: Path, *, check_crc: bool = False, catalog: Catalog | None = None) -> None:
        """``catalog``: `.metadata` as already read (by another reader of the same directory)."""
        self.path = Path(path)
        self._check_crc = check_crc
        self._metadata_file = self.path / ".metadata"
        if not self._metadata_file.exists():
            raise CheckpointError(f"{self.path}: no .metadata file; not a torch_dist checkpoint")
        catalog = catalog if catalog is not None else read_catalog(self._metadata_file)
        self._chunks, self._objects, self._storage = catalog.chunks, catalog.objects, catalog.storage
        self._maps: HandleCache[str, mmap.mmap | bytes] = HandleCache(self._map, _close_map, MAX_OPEN_FILES)
        self._located: dict[tuple[str, tuple[int, ...]], _Chunk] = {}
        self._extents: dict[str, list[Extent] | None] = {}
        self._checked: set[str] = set()
        self._prefix = _model_prefix(catalog.tensors)
        self._stored = self._stored_keys(catalog.tensors)
        self._tensors = {key: replace(catalog.tensors[stored], key=key) for key, stored in self._stored.items()}
        self.format = "torch_dcp" if self._prefix else "torch_dist"

    def _stored_keys(self, tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
        """Each tensor's key as presented, with its key in `.metadata` (torch_dcp: `model.` dropped)."""
        return {key[len(self._prefix) :]: key for key in tensors if key.startswith(self._prefix)}

    def _check_records(self, key: str, info: TensorInfo) -> None:
        """Before anything is allocated for ``key``: each chunk's record exists, lies inside its file and is
        big enough for the chunk's bytes, so a tensor never outgrows the files that hold it."""
        for offsets, sizes in self._chunks[key]:
            storage = self._storage.get((key, offsets))
            if storage is None:
                raise CheckpointError(f"{self._metadata_file}: no storage entry for {key} chunk at {offsets}")
            needed = info.dtype.itemsize * math.prod(sizes)
            with self._maps.use(storage.relative_path) as buf:
                file_size = len(buf)
            if storage.length < needed or storage.offset + storage.length > file_size:
                raise CheckpointError(
                    f"{self.path / storage.relative_path}: record [{storage.offset}, +{storage.length}) of {key} "
                    f"chunk at {offsets} cannot hold its {needed} bytes within the file's {file_size} (truncated?)"
                )

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @cached_property
    def common_state(self) -> dict[str, Any]:
        """Megatron's non-sharded state: `common.pt` (core <= 0.18) or the `common_state` object (0.19)."""
        state = load_common_pt(self.path)
        if state is None:
            keys = [key for key in self._objects if key.startswith("common_state")]
            if keys:
                state = self._load_object(keys[0])
                state = state[0] if isinstance(state, list) and len(state) == 1 else state
            else:  # plain DCP (torch_dcp): top-level objects such as "args" are entries of their own
                state = {key: self._load_object(key) for key in self._objects if key in _COMMON_OBJECTS}
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: common state is a {type(state).__name__}, expected a dict")
        return state

    def chunk_boxes(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return self._chunks[self._stored[key]]

    def chunk_file(self, key: str, offsets: tuple[int, ...]) -> str | None:
        """The `.distcp` file holding a chunk (named `__<writer rank>_<n>.distcp`)."""
        storage = self._storage.get((self._stored.get(key, key), offsets))
        return None if storage is None else str(storage.relative_path)

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        info, key = self._info(key)
        box = box or full_box(info.shape)
        out = np.empty([stop - start for start, stop in box], dtype=info.dtype.np)
        for offsets, sizes in self._chunks[key]:
            overlap = [(max(o, b0), min(o + s, b1)) for o, s, (b0, b1) in zip(offsets, sizes, box)]
            if any(lo >= hi for lo, hi in overlap):
                continue
            chunk = self._locate(key, info, offsets, sizes)
            src = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(overlap, offsets))
            dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(overlap, box))
            with self._maps.use(chunk.path) as buf:
                out[dst] = view(buf, chunk.start, chunk.ref).reshape(sizes)[src]
                release_pages(buf, chunk.start, chunk.nbytes)
        return out

    def extents(self, key: str) -> list[Extent] | None:
        if key not in self._extents:
            self._extents[key] = self._find_extents(key)
        return self._extents[key]

    def _find_extents(self, key: str) -> list[Extent] | None:
        info, key = self._info(key)
        found = []
        for offsets, sizes in self._chunks[key]:
            chunk = self._locate(key, info, offsets, sizes)
            if not is_contiguous(chunk.ref):
                return None
            box = tuple((o, o + n) for o, n in zip(offsets, sizes))
            offset = chunk.start + chunk.ref.storage_offset * info.dtype.itemsize
            found.append(Extent(str(self.path / chunk.path), offset, tuple(sizes), box))
        return found

    def _info(self, key: str) -> tuple[TensorInfo, str]:
        """The tensor's info and its key in the metadata, once its chunks are checked to tile it."""
        info = self._tensors.get(key)
        if info is None:
            raise CheckpointError(f"{self._metadata_file}: no tensor {key!r} in the checkpoint")
        key = self._stored[key]
        if key not in self._checked:
            check_tiling(key, info.shape, self._chunks[key], str(self._metadata_file))
            self._check_records(key, info)
            self._checked.add(key)
        return info, key

    def _locate(self, key: str, info: TensorInfo, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> _Chunk:
        """Where a chunk's tensor lies in its file; its record is parsed once, then remembered."""
        found = self._located.get((key, offsets))
        if found is not None:
            return found
        storage = self._storage_entry(key, offsets)
        with self._maps.use(storage.relative_path) as buf:
            archive = self._archive(buf, storage, key, offsets)
            ref = check_chunk_record(archive.load(), info.dtype, sizes, archive.source)
            chunk = _Chunk(storage.relative_path, archive.storage_start(ref), ref)
            if self._check_crc:
                archive.check_crc(ref)
                release_pages(buf, chunk.start, chunk.nbytes)
        self._located[(key, offsets)] = chunk
        return chunk

    def _storage_entry(self, key: str, offsets: tuple[int, ...] | None) -> Any:
        storage = self._storage.get((key, offsets))
        if storage is None:
            where = f"{key} chunk at {offsets}" if offsets is not None else key
            raise CheckpointError(f"{self._metadata_file}: no storage entry for {where}; the metadata is incomplete")
        return storage

    def _archive(self, buf: mmap.mmap, storage: Any, key: str, offsets: tuple[int, ...] | None) -> TorchArchive:
        where = f"{key} chunk at {offsets}" if offsets is not None else key
        if getattr(storage, "transform_descriptors", None):
            raise CheckpointError(
                f"{storage.relative_path}: {where} is stored with transforms {storage.transform_descriptors}, which are not supported"
            )
        return TorchArchive(
            buf, int(storage.offset), int(storage.length), f"{self.path / storage.relative_path} [{where}]"
        )

    def _load_object(self, key: str) -> Any:
        """A ShardedObject's bytes are a `torch.save` archive of the object."""
        storage = self._storage_entry(key, None)
        with self._maps.use(storage.relative_path) as buf:
            return self._archive(buf, storage, key, None).load()

    def validate(self) -> list[str]:
        """Each tensor's chunks tile it and each chunk record is what the metadata says (what `read` checks)."""
        problems = []
        for name in filter(is_model_key, self._tensors):  # what convert reads
            try:
                info, key = self._info(name)
                for offsets, sizes in self._chunks[key]:
                    self._locate(key, info, offsets, sizes)
            except CheckpointError as exc:
                problems.append(str(exc))
        return problems

    def _map(self, relative_path: str) -> mmap.mmap | bytes:
        return map_regular(self.path / relative_path, "shard file")

    def close(self) -> None:
        self._maps.close()


@dataclass(frozen=True)
class _Chunk:
    """A chunk's tensor: its file (relative), where its storage begins there, and its layout."""

    path: str
    start: int
    ref: TensorRef

    @property
    def nbytes(self) -> int:
        return self.ref.storage.numel * self.ref.storage.dtype.itemsize


def _close_map(buf: mmap.mmap | bytes) -> None:
    if isinstance(buf, mmap.mmap):  # an empty file is b""
        with contextlib.suppress(BufferError):  # a view is still referenced (say, by a traceback); collected later
            buf.close()


_COMMON_OBJECTS = ("args", "iteration", "checkpoint_version")
_MEGATRON_ROOTS = ("decoder.", "embedding.", "output_layer.", "mtp.")


def _model_prefix(tensors: Mapping[str, TensorInfo]) -> str:
    """ "model." when the checkpoint is plain DCP of a `{"model": state_dict}` (torch_dcp), else ""."""
    if any(key.startswith(_MEGATRON_ROOTS) for key in tensors):
        return ""
    return "model." if any(key.startswith("model." + root) for key in tensors for root in _MEGATRON_ROOTS) else ""
