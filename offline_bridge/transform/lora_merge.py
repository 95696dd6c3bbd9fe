"""Adapter merges in Megatron layout, all math in fp32 — on the GPU when one is present (or asked for).

`W' = W + scale · fuse(B_i @ A_i)`; DoRA then rescales each output row to its magnitude. Like `casting`,
it imports torch lazily: only conversions that merge pay for it. On the CPU the weight is worked through in
blocks of rows whose fp32 temporaries stay in cache, each rounded to the output dtype as it is done.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from ..dtypes import FLOAT32, DType
from ..errors import OptionError
from ..plan.rules import Dims, fused_part_rows

__all__ = ["ROW_BLOCK", "merge_tensor", "resolve_device"]

ROW_BLOCK = 2**18  # elements per block of rows on the CPU (1 MB of fp32)


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
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {name}: merges run on cpu or cuda[:N] only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return device


def _tensor(array: np.ndarray, dtype: DType, device: Any, *, widen: bool = True) -> Any:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array)).view(getattr(torch, dtype.torch_name))
    if device.type == "cuda":  # pinned host memory lets the copy overlap with the previous matmul
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.float() if widen else tensor


def _empty(shape: tuple[int, int], dtype: DType, device: Any) -> Any:
    """An uninitialized tensor; on the CPU numpy's memory, which comes in huge pages (torch's faults 4 KB at a
    time: 4x the cost of filling it)."""
    import torch

    if device.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype.np)).view(getattr(torch, dtype.torch_name))
    return torch.empty(shape, dtype=getattr(torch, dtype.torch_name), device=device)


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


def merge_tensor(
    weight: np.ndarray,
    weight_dtype: DType,
    pieces: list[tuple[np.ndarray, np.ndarray] | None],
    adapter_dtype: DType,
    *,
    layout: str,
    scale: float,
    dims: Dims,
    magnitude: np.ndarray | None = None,
    device: str = "auto",
    out_dtype: DType | None = None,
) -> Any:
    """The merged weight as a torch tensor on the merge device: fp32, or rounded once to ``out_dtype``."""
    import torch

    target = resolve_device(device)
    w = _tensor(weight, weight_dtype, target, widen=False)
    rows, columns = w.shape
    factors = [
        None
        if piece is None
        else (
            _tensor(piece[1], adapter_dtype, target),
            _tensor(piece[0], adapter_dtype, target),
        )
        for piece in pieces
    ]
    if layout == "plain" and factors[0] is not None:  # B @ A block by block: no full-size delta
        b, a = factors[0]

        def add_delta(block: slice, merged: Any) -> None:
            merged.addmm_(b[block], a, alpha=scale)

    else:  # an untargeted CanonicalLoRA part adds nothing
        parts = fused_part_rows(layout, dims, rows, len(pieces))
        fused = _fuse(
            [torch.zeros(n, columns, device=target) if f is None else f[0] @ f[1] for f, n in zip(factors, parts)],
            layout,
            dims,
        )

        def add_delta(block: slice, merged: Any) -> None:
            merged.add_(fused[block], alpha=scale)

    m = None if magnitude is None else _tensor(magnitude, adapter_dtype, target)
    out = _empty((rows, columns), out_dtype or FLOAT32, target)
    step = max(1, ROW_BLOCK // max(1, columns)) if target.type == "cpu" else max(1, rows)
    scratch = torch.empty(min(step, rows), columns, device=target)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        merged = scratch[: min(step, rows - start)].copy_(w[block])
        add_delta(block, merged)  # W + scale · delta in fp32, rounded once as written
        if m is not None:  # DoRA: each output row rescaled to its learned magnitude
            merged = m[block].unsqueeze(1) * merged / merged.norm(dim=1, keepdim=True)
        out[block] = merged
    return out
