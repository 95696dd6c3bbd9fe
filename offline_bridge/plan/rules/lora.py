"""Adapter tensors in PEFT's layouts: expert LoRA A / B as ParamWrapper's, and how the parts of a fused
weight share its rows. (TP row orders are undone when a source is read: `offline_bridge.plan.row_order`.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .core import Rule
from .dims import Dims, Shape

__all__ = ["ExpertMajorA", "RankMajorB", "fused_part_rows"]


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
