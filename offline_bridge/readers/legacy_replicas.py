"""Replicated tensors (norms, routers, experts without expert TP) whose copies differ between the TP ranks of a
legacy save. Megatron keeps TP rank 0's copy (a torch_dist save stores replica 0; Megatron-LM's converters read
rank 0), so that copy is taken, with one warning per tensor giving the largest absolute difference; with
``strict`` the tensor is refused instead, naming the file."""

from __future__ import annotations

import logging
import threading

import numpy as np

from ..dtypes import DType
from ..errors import CheckpointError

__all__ = ["ReplicaCheck"]

log = logging.getLogger(__name__)


class ReplicaCheck:
    """Compares the TP copies of a replicated tensor when it is read; warns once per tensor."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def pick(self, key: str, copies: list[np.ndarray], sources: list[str], dtype: DType) -> np.ndarray:
        """TP rank 0's copy (``copies`` in TP rank order, their bytes as ``dtype`` stores them; ``sources``
        naming where each lies). Copies are compared byte for byte."""
        first = copies[0]
        differing = [(i, c) for i, c in enumerate(copies[1:], 1) if first.tobytes() != c.tobytes()]
        if not differing:
            return first
        if self.strict:
            raise CheckpointError(
                f"{sources[differing[0][0]]} differs from {sources[0]} but should be replicated over TP ranks "
                "(without --strict, TP rank 0's copy is taken)"
            )
        with self._lock:
            if key in self._warned:
                return first
            self._warned.add(key)
        wide = first.view(dtype.values).astype(np.float64)
        gaps = (np.abs(c.view(dtype.values).astype(np.float64) - wide) for _, c in differing)
        largest = max(float(np.nanmax(gap, initial=0.0)) for gap in gaps)
        log.warning(
            "%s differs from %s on %d of %d TP ranks (largest absolute difference %.6g); taking TP rank 0's copy "
            "as Megatron does (--strict refuses)",
            sources[differing[0][0]],
            sources[0],
            len(differing),
            len(copies),
            largest,
        )
        return first
