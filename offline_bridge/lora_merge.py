"""LoRA merge, `W' = W + scale · B @ A`, in fp32 — on the GPU when one is present (or asked for), else CPU.

Like `casting`, it imports torch lazily: only conversions that merge pay for it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from .dtypes import DType
from .errors import OptionError

__all__ = ["merge", "resolve_device"]


@cache
def resolve_device(name: str) -> Any:
    """``auto`` → the first CUDA device if torch sees one, else the CPU; ``cpu`` / ``cuda[:N]`` as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return device


def _tensor(array: np.ndarray, dtype: DType, device: Any) -> Any:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array)).view(getattr(torch, dtype.torch_name))
    if device.type == "cuda":  # pinned host memory lets the copy overlap with the previous matmul
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.float()


def merge(
    weight: np.ndarray,
    weight_dtype: DType,
    a: np.ndarray,
    b: np.ndarray,
    adapter_dtype: DType,
    scale: float,
    device: str = "auto",
) -> np.ndarray:
    """``weight + scale · b @ a`` as fp32 numpy, all math in fp32 (one rounding when the caller casts)."""
    target = resolve_device(device)
    w = _tensor(weight, weight_dtype, target)
    delta = _tensor(b, adapter_dtype, target) @ _tensor(a, adapter_dtype, target)
    return (w + scale * delta).cpu().numpy()
