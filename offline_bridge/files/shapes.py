"""Shapes read from a file: checked against what numpy can represent before anything is built from them.

numpy refuses more than 64 dimensions and any shape whose extent, zero-length axes aside, times the item size
exceeds its index type (`[0, 2**63]` holds no byte yet cannot be made): such a shape is bad input to us, one
line naming the file, never a numpy error later.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from .small_files import quote

__all__ = ["MAX_NDIM", "shape_problem"]

MAX_NDIM = 64  # numpy 2's NPY_MAXDIMS


def shape_problem(shape: Sequence[int], itemsize: int) -> str | None:
    """What is wrong with ``shape`` of ``itemsize``-byte elements for numpy, or None."""
    if len(shape) > MAX_NDIM:
        return f"{len(shape)} dimensions, more than the {MAX_NDIM} numpy can represent"
    if math.prod(max(n, 1) for n in shape) * max(itemsize, 1) > sys.maxsize:
        return f"shape {quote(list(shape))} is larger than numpy can index"
    return None
