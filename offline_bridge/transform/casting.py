"""dtype casts, the one place torch is needed on the byte path; imported lazily, only when casting."""

from __future__ import annotations

import importlib
import threading
from functools import cache
from typing import Any

import numpy as np

from ..dtypes import DType

__all__ = ["as_numpy", "cast", "preload_torch"]

_CARRIER = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch types that view any dtype's bytes


@cache
def preload_torch() -> None:
    """Start importing torch in the background (over a second of CPU) for a conversion that will need it."""
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True, name="import-torch").start()


def cast(array: np.ndarray, source: DType, target: DType) -> np.ndarray:
    """``array`` (bytes of ``source``) as ``target``, rounded the way torch's ``.to`` rounds."""
    if source == target:
        return array
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array)).view(getattr(torch, source.torch_name))
    return as_numpy(tensor.to(getattr(torch, target.torch_name)), target)


def as_numpy(tensor: Any, dtype: DType) -> np.ndarray:
    """A CPU torch tensor of ``dtype`` as numpy, sharing its memory (bf16 as its ``uint16`` bytes)."""
    import torch

    return tensor.view(getattr(torch, _CARRIER[dtype.itemsize])).numpy().view(dtype.np)
