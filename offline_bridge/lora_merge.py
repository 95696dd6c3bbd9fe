"""Adapter merges in Megatron layout, all math in fp32 — on the GPU when one is present (or asked for).

`W' = W + scale · fuse(B_i @ A_i)`; DoRA then rescales each output row to its magnitude. Like `casting`,
it imports torch lazily: only conversions that merge pay for it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from .dtypes import DType
from .errors import OptionError
from .rules import Dims, fused_part_rows, rank_major_gated, swiglu_rows

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


def _fuse(deltas: list[Any], layout: str, dims: Dims) -> Any:
    import torch

    if layout == "plain":
        return deltas[0]
    if layout in ("gated", "stacked"):  # canonical [gate; up] (B rows put back in order), or packed experts
        return torch.cat(deltas)
    q, k, v = deltas  # canonical q / k / v: interleave per query group as the fused QKV weight is
    groups, columns = dims.num_query_groups, q.shape[1]
    return torch.cat([q.view(groups, -1, columns), k.view(groups, -1, columns), v.view(groups, -1, columns)], 1).view(
        -1, columns
    )


def merge(
    weight: np.ndarray,
    weight_dtype: DType,
    pieces: list[tuple[np.ndarray, np.ndarray] | None],
    adapter_dtype: DType,
    *,
    layout: str,
    scale: float,
    dims: Dims,
    tp: int = 1,
    magnitude: np.ndarray | None = None,
    gated_rows: bool = False,
    device: str = "auto",
) -> np.ndarray:
    """The merged weight as fp32 numpy (one rounding when the caller casts to the output dtype)."""
    target = resolve_device(device)
    w = _tensor(weight, weight_dtype, target)
    deltas = []
    for piece, rows in zip(pieces, fused_part_rows(layout, dims, w.shape[0], len(pieces))):
        if piece is None:  # an untargeted CanonicalLoRA part adds nothing
            deltas.append(w.new_zeros(rows, w.shape[1]))
            continue
        a, b = piece
        b = swiglu_rows(b, tp) if layout == "gated" else b
        deltas.append(_tensor(b, adapter_dtype, target) @ _tensor(a, adapter_dtype, target))
    merged = w + scale * _fuse(deltas, layout, dims)
    if magnitude is not None:  # DoRA: each output row rescaled to its learned magnitude
        m = _tensor(rank_major_gated(magnitude, tp) if gated_rows else magnitude, adapter_dtype, target)
        merged = m.unsqueeze(1) * merged / merged.norm(dim=1, keepdim=True)
    return merged.cpu().numpy()
