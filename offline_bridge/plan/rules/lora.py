"""Row orders of adapter and DoRA tensors as Megatron saves them (swiglu factory order, rank-major gated rows,
expert-major LoRA A/B) and the rules that put them in HF order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .core import GatedMLP, Rule
from .dims import Dims, Shape

__all__ = [
    "ExpertMajorA",
    "RankMajorB",
    "RankMajorGatedMLP",
    "SwigluRows",
    "fused_part_rows",
    "rank_major_gated",
    "swiglu_rows",
]


def swiglu_rows(array: np.ndarray, tp: int) -> np.ndarray:
    """Rows saved by Megatron's swiglu sharded-state-dict factory at training TP ``tp`` back in true order:
    rank t's local rows were split in halves stored at blocks t and tp + t of 2·tp."""
    blocks = np.split(array, 2 * tp)
    return np.concatenate([blocks[i] for r in range(tp) for i in (r, tp + r)])


def rank_major_gated(array: np.ndarray, tp: int) -> np.ndarray:
    """Rank-major local fc1 rows `[gate_0, up_0, gate_1, up_1, ...]` (DoRA magnitudes) → `[gate; up]`."""
    blocks = np.split(array, 2 * tp)
    return np.concatenate(blocks[0::2] + blocks[1::2])


@dataclass(frozen=True)
class SwigluRows(Rule):
    """One tensor whose rows are in the swiglu factory's order (CanonicalLoRA gate/up B), put in true order."""

    rows_only: ClassVar[bool] = True

    tp: int = 1

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [swiglu_rows(array, self.tp)]


@dataclass(frozen=True)
class ExpertMajorA(Rule):
    """A layer's expert LoRA A `[E, r, in]` (or one shared `[r, in]`) as PEFT ParamWrapper's `[E·r, in]`."""

    experts: int = 0

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [(self.experts * shape[-2], shape[-1])]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        stacked = array if array.ndim == 3 else np.broadcast_to(array, (self.experts, *array.shape))
        return [np.ascontiguousarray(stacked).reshape(-1, array.shape[-1])]


@dataclass(frozen=True)
class RankMajorB(Rule):
    """A layer's expert LoRA B `[E, out, r]` (or one shared `[out, r]`) as ParamWrapper's `[out, r·E]`:
    column `j·E + e` is expert e's rank-j column."""

    experts: int = 0

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [(shape[-2], shape[-1] * self.experts)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        stacked = array if array.ndim == 3 else np.broadcast_to(array, (self.experts, *array.shape))
        return [np.ascontiguousarray(stacked.transpose(1, 2, 0)).reshape(array.shape[-2], -1)]


def fused_part_rows(layout: str, dims: Dims, rows: int, parts: int) -> list[int]:
    """Rows each part adds to a fused weight of ``rows`` rows: q, k, v per the config ("qkv"), else equal parts."""
    if layout == "qkv":
        return [dims.num_heads * dims.head_dim] + [dims.num_query_groups * dims.head_dim] * 2
    return [rows // parts] * parts


@dataclass(frozen=True)
class RankMajorGatedMLP(GatedMLP):
    """Gated fc1 rows stored rank-major, `[gate_t; up_t]` per TP rank (DoRA magnitudes) → gate, up."""

    tp: int = 1

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return super().apply(rank_major_gated(array, self.tp), dims)
