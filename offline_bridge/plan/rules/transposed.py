"""GPT-OSS's packed experts: every expert of a layer stacked as one HF parameter laid out `[E, in, out]`
(transposed relative to `nn.Linear`), fc1's `[gate; up]` rows interleaved as HF's gate `[..., ::2]` and
up `[..., 1::2]` columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import CheckpointError
from .core import Packed
from .dims import Dims, Shape
from .lora import RankMajorB

__all__ = ["InterleavedPacked", "InterleavedRankMajorB", "TransposedPacked"]


def _interleaved(experts: np.ndarray) -> np.ndarray:
    """Each expert's rows (axis 1) `[gate; up]` as `g0, u0, g1, u1, ...`."""
    halves = experts.reshape(experts.shape[0], 2, -1, *experts.shape[2:])
    return np.swapaxes(halves, 1, 2).reshape(experts.shape)


@dataclass(frozen=True)
class TransposedPacked(Packed):
    """A layer's experts `[E·out, in]` (a bias: `[E·out]`) as `[E, in, out]` (a bias: `[E, out]`)."""

    interleave: ClassVar[bool] = False  # fc1: rows `[gate; up]` become columns `g0, u0, g1, u1, ...`

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        out = shape[0] // dims.num_experts
        if shape[0] % dims.num_experts or (self.interleave and out % 2):
            raise CheckpointError(
                f"{key} has {shape[0]} rows, which {dims.num_experts} experts"
                f"{' of gated (gate; up) rows' if self.interleave else ''} cannot share"
            )
        return [(dims.num_experts, *shape[1:], out)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        experts = array.reshape(dims.num_experts, -1, *array.shape[1:])
        if self.interleave:
            experts = _interleaved(experts)
        return [np.ascontiguousarray(np.swapaxes(experts, 1, 2) if experts.ndim == 3 else experts)]


@dataclass(frozen=True)
class InterleavedPacked(TransposedPacked):
    """fc1 of the experts (weight or bias): `[gate; up]` rows per expert, interleaved and transposed."""

    interleave: ClassVar[bool] = True


@dataclass(frozen=True)
class InterleavedRankMajorB(RankMajorB):
    """PEFT ParamWrapper's B of GPT-OSS's `gate_up_proj` (`is_transposed`: out = its last axis): rank-major
    columns, rows in HF's interleaved gate / up order."""

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        stacked = array if array.ndim == 3 else np.broadcast_to(array, (self.experts, *array.shape))
        return super().apply(_interleaved(np.ascontiguousarray(stacked)), dims)
