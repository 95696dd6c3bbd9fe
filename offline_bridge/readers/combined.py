"""A base checkpoint and an adapter checkpoint seen as one: their keys never collide (`.adapter.`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np

from ..errors import CheckpointError
from .base import Box, CheckpointReader, Extent, TensorInfo

__all__ = ["CombinedReader"]


class CombinedReader(CheckpointReader):
    """Tensors of ``base`` and ``adapter``; args from the base."""

    def __init__(self, base: CheckpointReader, adapter: CheckpointReader) -> None:
        self.base, self.adapter, self.path = base, adapter, adapter.path
        self.format = adapter.format
        both = base.tensors.keys() & adapter.tensors.keys()
        if both:
            raise CheckpointError(f"{adapter.path}: holds base tensors too ({sorted(both)[0]}, ...); pass it alone")
        self._tensors = {**base.tensors, **adapter.tensors}

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def args(self) -> argparse.Namespace | None:
        return self.base.args

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        return self._holder(key).read(key, box)

    def extents(self, key: str) -> list[Extent] | None:
        return self._holder(key).extents(key)

    def _holder(self, key: str) -> CheckpointReader:
        return self.adapter if key in self.adapter.tensors else self.base

    def close(self) -> None:
        self.base.close()
        self.adapter.close()
