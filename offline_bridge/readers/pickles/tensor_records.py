"""The one validation of what a checkpoint says about a tensor, used by every reader, `convert` and `inspect`:
our own, because torch and numpy take a record's sizes and strides on trust.

A shape from metadata and a tensor record from a pickle (`_rebuild_tensor_v2`: storage, offset, size,
stride) are numbers a file claims. Before anything is sized, viewed or copied from them: at most `MAX_DIMS`
non-negative sizes; a record's elements all inside its storage, the storage inside its archive member, no
element read twice (no broadcast strides); and a chunk record the very shape and dtype its metadata says
(DCP compares sizes too, not element counts).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

from ...dtypes import DType
from ...errors import CheckpointError
from .safe_pickle import TensorRef

__all__ = ["MAX_DIMS", "check_chunk_record", "check_record", "check_shape"]

MAX_DIMS = 64  # numpy's limit; Megatron's tensors have at most 5


def check_shape(values: Iterable[Any], what: str) -> tuple[int, ...]:
    """``values`` as a shape: at most `MAX_DIMS` non-negative integers; ``what`` names it in errors."""
    try:
        shape = tuple(operator.index(n) for n in values)
    except TypeError as exc:
        raise CheckpointError(f"{what}: shape is not a list of integers ({exc})") from exc
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{what}: shape of {len(shape)} dimensions, more than {MAX_DIMS}")
    if any(n < 0 for n in shape):
        raise CheckpointError(f"{what}: shape {shape} has a negative size")
    return shape


def check_record(ref: TensorRef, member_size: int, source: str) -> None:
    """``ref`` reads only bytes of its storage, each element once, and the storage fits its ``member_size``."""
    storage = ref.storage
    check_shape(ref.shape, f"{source}: tensor record")
    if len(ref.stride) != len(ref.shape) or any(s < 0 for s in ref.stride) or ref.storage_offset < 0:
        raise CheckpointError(
            f"{source}: tensor record has strides {ref.stride} and offset {ref.storage_offset} for shape {ref.shape}"
        )
    if not 0 <= storage.numel * storage.dtype.itemsize <= member_size:
        raise CheckpointError(
            f"{source}: storage of {storage.numel} elements does not fit its {member_size} bytes (truncated?)"
        )
    if not _fits(ref):
        raise CheckpointError(
            f"{source}: tensor {ref.shape} (strides {ref.stride}, offset {ref.storage_offset}) "
            f"does not fit its storage of {storage.numel} elements"
        )


def _fits(ref: TensorRef) -> bool:
    """Every element inside the storage, distinct ones apart: strides that overlap (a broadcast of a few
    elements into a huge tensor) are refused."""
    if not ref.shape or 0 in ref.shape:
        return ref.storage_offset + (0 if ref.shape else 1) <= ref.storage.numel
    last = ref.storage_offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= ref.storage.numel or math.prod(ref.shape) > ref.storage.numel:
        return False
    span = 1  # strides in increasing order must each step over everything the smaller ones cover
    for s, n in sorted((s, n) for n, s in zip(ref.shape, ref.stride) if n > 1):
        if s < span:
            return False
        span = s * n
    return True


def check_chunk_record(ref: Any, dtype: DType, sizes: tuple[int, ...], source: str) -> TensorRef:
    """A `.distcp` record is the tensor the metadata says: a tensor, of its dtype and its sizes."""
    if not isinstance(ref, TensorRef):
        raise CheckpointError(f"{source}: record holds a {type(ref).__name__}, not a tensor")
    check_shape(ref.shape, f"{source}: tensor record")
    if ref.storage.dtype != dtype:
        raise CheckpointError(f"{source}: chunk dtype {ref.storage.dtype} differs from metadata {dtype}")
    if tuple(ref.shape) != tuple(sizes):
        raise CheckpointError(f"{source}: chunk shape {ref.shape} does not match metadata {sizes}")
    return ref
