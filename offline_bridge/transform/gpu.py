"""The GPU end of a merge (`--device cuda`): the merged weight, already rounded on the device, is split there
into its HF tensors (QKV heads, gate / up halves) and each copied into pinned host memory, the copies queued
behind the compute. Imported only when a merge runs on a CUDA device, so a CPU-only machine never loads it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..dtypes import DType
from ..plan.rules import Dims
from ..plan.schema import Step
from ..plan.transfer import selected_rows
from .casting import as_numpy

__all__ = ["split_rows"]


def split_rows(merged: Any, step: Step, dims: Dims, dtype: DType) -> list[np.ndarray] | None:
    """``step``'s HF tensors cut from ``merged`` (on its GPU) as host arrays; None if its rule does more than
    pick rows (the caller then applies it on the host)."""
    rows = selected_rows(step, dims)
    if rows is None:
        return None
    hosts = []
    for ranges in rows:
        part = torch.cat([merged[start:stop] for start, stop in ranges])
        host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        host.copy_(part, non_blocking=True)
        hosts.append(host)
    torch.cuda.current_stream(merged.device).synchronize()
    return [as_numpy(host, dtype) for host in hosts]
