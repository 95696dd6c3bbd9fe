"""dtype casts, the one place torch is needed on the byte path; imported lazily, only when casting."""

from __future__ import annotations

import numpy as np

from .dtypes import DType

__all__ = ["cast"]

_CARRIER = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch types that view any dtype's bytes


def cast(array: np.ndarray, source: DType, target: DType) -> np.ndarray:
    """``array`` (bytes of ``source``) as ``target``, rounded the way torch's ``.to`` rounds."""
    if source == target:
        return array
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array)).view(getattr(torch, source.torch_name))
    tensor = tensor.to(getattr(torch, target.torch_name))
    return tensor.view(getattr(torch, _CARRIER[target.itemsize])).numpy().view(target.np)
