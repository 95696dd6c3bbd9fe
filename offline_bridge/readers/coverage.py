"""Check that a tensor's chunks tile it exactly once: no gap, no overlap, nothing out of bounds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import CheckpointError

__all__ = ["check_tiling"]


def check_tiling(
    key: str, shape: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]], source: str
) -> None:
    """Raise naming ``key`` unless the (offsets, sizes) chunks partition ``shape``.

    Chunk borders split every axis into intervals; each chunk must cover a block of the resulting grid
    and every grid cell must be covered once. Cost grows with the grid, not with the tensor.
    """
    for offsets, sizes in chunks:
        if len(offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise CheckpointError(
                f"{source}: chunk at {tuple(offsets)} of size {tuple(sizes)} lies outside {key} {tuple(shape)}"
            )
    if 0 in shape:
        return
    borders = [
        sorted({0, n, *(o[a] for o, _ in chunks), *(o[a] + s[a] for o, s in chunks)}) for a, n in enumerate(shape)
    ]
    hits = np.zeros([len(b) - 1 for b in borders], dtype=np.int64)
    for offsets, sizes in chunks:
        cell = tuple(
            slice(np.searchsorted(b, o), np.searchsorted(b, o + s)) for b, o, s in zip(borders, offsets, sizes)
        )
        hits[cell] += 1
    if (hits > 1).any():
        raise CheckpointError(f"{source}: chunks of {key} overlap; the checkpoint is inconsistent")
    if (hits == 0).any():
        raise CheckpointError(f"{source}: chunks of {key} leave a gap (a chunk is missing from the metadata)")
