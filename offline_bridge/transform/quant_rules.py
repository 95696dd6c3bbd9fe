"""The rules quantizer state needs: an amax fanned out to every target, and values computed in fp32 (FP8
weights, their scales). Beside the casts they use, not in the plan: they compute new values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..dtypes import FLOAT32, DType, by_torch_name
from ..plan.rules import Dims, Repeat, Rule, Shape
from .casting import cast

__all__ = ["FP8", "FP8_MAX", "Computed", "Divisor", "Fanout", "divisor", "module_of"]

FP8_MAX = 448.0  # largest finite FP8-E4M3 value
FP8 = by_torch_name("float8_e4m3fn")


# One divisor of `Computed`, as plan data: a number, or an fp32 array as its shape and values.
Divisor = float | tuple[Shape, tuple[float, ...]]


def divisor(value: np.ndarray | float) -> Divisor:
    """``value`` as plan data (fp32 values are exact as Python floats)."""
    if isinstance(value, float):
        return value
    array = np.asarray(value, dtype=np.float32)
    return (array.shape, tuple(float(x) for x in array.reshape(-1)))


def _divide_by(value: Divisor) -> np.ndarray | float:
    if isinstance(value, float):
        return value
    shape, values = value
    return np.asarray(values, dtype=np.float32).reshape(shape)


def module_of(name: str) -> str:
    """The HF module a tensor name belongs to (the name without its last part)."""
    return name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Fanout(Repeat):
    """One amax under every target name; a per-tensor one as the 0-d tensor ModelOpt's quantizers hold."""

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [() if math.prod(shape) == 1 else shape] * len(self.targets)

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return super().apply(array.reshape(()) if array.size == 1 else array, dims)


@dataclass(frozen=True)
class Computed(Rule):
    """``inner``'s outputs computed on in fp32: FP8 weight values (w / scale, clipped to ±448) or scales
    (amax / 448, in the compressed-tensors shape)."""

    computes: ClassVar[DType | None] = FLOAT32

    inner: Rule | None = None
    stored: DType = FLOAT32  # the source's dtype (rules see raw bytes)
    scales: tuple[Divisor, ...] = ()  # one divisor per target
    clip: bool = False
    shapes: tuple[Shape, ...] | None = None  # output shapes, when not the inner rule's

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return list(self.shapes) if self.shapes else self.inner.target_shapes(shape, dims, key)

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        values = cast(array, self.stored, FLOAT32).astype(np.float32)
        parts = self.inner.apply(values, dims)
        outs = [part / _divide_by(scale) for part, scale in zip(parts, self.scales, strict=True)]
        outs = [np.clip(out, -FP8_MAX, FP8_MAX) if self.clip else out for out in outs]
        return [out.reshape(shape) for out, shape in zip(outs, self.shapes)] if self.shapes else outs
