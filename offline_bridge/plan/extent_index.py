"""Where a stacked tensor's chunks lie, found by layer and expert instead of by scanning them all.

Megatron stacks each expert weight as one [experts, ...] tensor per layer (512 chunks at DeepSeek-V3's 256
experts), or one [layers, experts, ...] tensor (15k chunks); every HF tensor takes one expert of it. Scanning
every chunk per HF tensor is quadratic, so each key's chunks are bucketed once by the stacked indices they cover.
"""

from __future__ import annotations

import itertools

from ..readers.base import Box, CheckpointReader, Extent

__all__ = ["ExtentIndex"]


class ExtentIndex:
    """A reader's `extents`, plus those of one stacked position, each key's buckets built on first use."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self._buckets: dict[tuple[str, int], dict[tuple[int, ...], list[Extent]]] = {}

    def overlapping(self, key: str, box: Box, lead: int) -> list[Extent] | None:
        """The extents of ``key`` that may overlap ``box`` (in the reader's order), whose first ``lead`` axes
        are stacked (one index each); None when the reader cannot say where the chunks lie."""
        extents = self.reader.extents(key)
        if extents is None or lead <= 0 or any(b - a != 1 for a, b in box[:lead]):
            return extents
        buckets = self._buckets.get((key, lead))
        if buckets is None:
            buckets = self._buckets[(key, lead)] = {}
            for extent in extents:
                for at in itertools.product(*(range(a, b) for a, b in extent.box[:lead])):
                    buckets.setdefault(at, []).append(extent)
        return buckets.get(tuple(a for a, _ in box[:lead]), [])
