"""dtype casts in numpy through `ml_dtypes` (bfloat16, float8), rounded as torch's ``.to`` rounds; and torch's
CPU tensors seen as numpy, for the merges, the only step that needs torch.

`ml_dtypes` (JAX's numpy dtypes) rounds to nearest even like torch, bit for bit on every non-NaN value
(`tests/test_casting.py` checks it against torch); NaN stays NaN, its payload unspecified as in torch. float8
E4M3FN has no infinity: values beyond its range saturate to ±448 as torch does (ml_dtypes alone gives NaN).
"""

from __future__ import annotations

import importlib
import threading
from functools import cache
from typing import Any

import ml_dtypes
import numpy as np

from ..dtypes import DType

__all__ = ["as_numpy", "cast", "preload_torch"]

_CARRIER = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch types that view any dtype's bytes
_SATURATING = {"float8_e4m3fn"}  # no infinity: torch clamps to the largest finite value


@cache
def preload_torch() -> None:
    """Start importing torch in the background (over a second of CPU) for a conversion that will need it."""
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True, name="import-torch").start()


def cast(array: np.ndarray, source: DType, target: DType) -> np.ndarray:
    """``array`` (bytes of ``source``) as ``target``, rounded the way torch's ``.to`` rounds."""
    if source == target:
        return array
    values = np.ascontiguousarray(array).view(source.values)
    if target.torch_name in _SATURATING:
        limit = float(ml_dtypes.finfo(target.values).max)
        values = np.clip(values, -limit, limit)
    return values.astype(target.values).view(target.np)


def as_numpy(tensor: Any, dtype: DType) -> np.ndarray:
    """A CPU torch tensor of ``dtype`` as numpy, sharing its memory (bf16 as its ``uint16`` bytes)."""
    import torch

    return tensor.view(getattr(torch, _CARRIER[dtype.itemsize])).numpy().view(dtype.np)
