"""DCP's `.metadata`, read within bounds set by the `.distcp` files it describes.

The file is read whole (through `small_files`) only if it is no larger than the shard files beside it (a
real one is a few percent of them; `_FLOOR` for tiny checkpoints), and its entries are counted before any
is catalogued: DCP pickles each chunk and record as objects of their own (150 bytes and more), so a pickle
listing more than one per `_MIN_ENTRY` bytes repeats objects through its memo to claim memory. Then each
entry is checked for the types and ranks DCP writes, and the records for being disjoint.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import DType
from ..errors import CheckpointError
from ..files.small_files import METADATA_LIMIT, read_small
from .base import TensorInfo
from .pickles.safe_pickle import safe_loads
from .pickles.tensor_records import check_shape

__all__ = ["Catalog", "read_catalog"]

_FLOOR = 1 << 20  # bytes of `.metadata` allowed whatever the shard files' size
_MIN_ENTRY = 16  # bytes of pickle per chunk or record, at least

Chunks = list[tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass
class Catalog:
    """What `.metadata` lists: tensors with their chunks, other objects, and where each record lies."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    chunks: dict[str, Chunks] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)
    storage: dict[tuple[str, tuple[int, ...] | None], Any] = field(default_factory=dict)


def read_catalog(file: Path) -> Catalog:
    """The catalog of the `.metadata` ``file``, whose shard files are the `*.distcp` beside it."""
    shard_bytes = sum(p.stat().st_size for p in file.parent.glob("*.distcp") if p.is_file())
    limit = min(METADATA_LIMIT, max(_FLOOR, shard_bytes))
    data = read_small(file, limit, "DCP metadata")
    metadata = safe_loads(data, str(file))
    entries = _field(metadata, "state_dict_metadata", file)
    records = _field(metadata, "storage_data", file)
    try:
        count = len(records) + sum(len(getattr(entry, "chunks", None) or ()) for entry in entries.values())
        if count > len(data) // _MIN_ENTRY:
            raise CheckpointError(f"{file}: lists {count} chunks and records in {len(data)} bytes (repeated objects)")
        return _catalog(entries, records, file)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"{file}: DCP metadata is malformed ({type(exc).__name__}: {exc})") from exc


def _catalog(entries: dict, records: dict, file: Path) -> Catalog:
    """Tensors, their chunks and the storage records, each checked for the types and ranks DCP writes."""
    found = Catalog()
    for key, entry in entries.items():
        chunks = getattr(entry, "chunks", None)
        if chunks is None:
            found.objects.append(str(key))
            continue
        dtype = entry.properties.dtype
        if not isinstance(dtype, DType):
            raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {dtype!r}")
        shape = check_shape(entry.size, f"{file}: tensor {key}")
        found.tensors[key] = TensorInfo(str(key), shape, dtype)
        found.chunks[key] = [(_sizes(c.offsets), _sizes(c.sizes)) for c in chunks]
        if any(len(o) != len(shape) or len(s) != len(shape) for o, s in found.chunks[key]):
            raise ValueError(f"a chunk of {key} does not have the tensor's {len(shape)} dimensions")
    for index, info in records.items():
        offset = getattr(index, "offset", None)  # DCP omits fields left at their default
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"storage file {name!r} of {index.fqn} is not a file name in the checkpoint directory")
        _sizes((info.offset, info.length))
        found.storage[(index.fqn, None if offset is None else _sizes(offset))] = info
    _check_disjoint(found.storage.values())
    return found


def _check_disjoint(records: Iterable[Any]) -> None:
    """No two records share a byte, so tensors read from them never outgrow the files (DCP writes each once)."""
    previous: dict[str, tuple[int, int]] = {}
    for info in sorted(records, key=lambda r: (r.relative_path, r.offset)):
        start, end = previous.get(info.relative_path, (0, 0))
        if info.offset < end:
            raise ValueError(f"records [{start}, {end}) and [{info.offset}, ...) of {info.relative_path} overlap")
        previous[info.relative_path] = (info.offset, info.offset + info.length)


def _sizes(values: Any) -> tuple[int, ...]:
    """Non-negative integers, as DCP writes offsets, sizes and byte ranges."""
    sizes = tuple(operator.index(n) for n in values)
    if any(n < 0 for n in sizes):
        raise ValueError(f"negative size or offset in {sizes}")
    return sizes


def _field(obj: Any, name: str, file: Path) -> Any:
    value = getattr(obj, name, None)
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: DCP metadata has no {name}; not a torch_dist checkpoint")
    return value
