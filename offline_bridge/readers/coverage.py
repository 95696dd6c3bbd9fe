"""Check that a tensor's chunks tile it exactly once: no gap, no overlap, nothing out of bounds.

In linear time, whatever the chunks: on the tensor's box every function is, uniquely, a sum of products
of per-axis "steps" (1 on [t, end) of one axis), and a chunk [o, o + s) on an axis is the step at o minus
the step at o + s (a step at 0 is the constant 1; one at the end is 0). The chunks tile the tensor exactly
when their indicators sum to 1, that is when all their step products cancel except the constant, counted
once. A chunk cut along k axes expands into at most 2^k products, so k is bounded (`MAX_CUT_AXES`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

from ..errors import CheckpointError

__all__ = ["MAX_CUT_AXES", "check_tiling"]

MAX_CUT_AXES = 6  # Megatron cuts a chunk along layers, experts and one tensor-parallel axis at most


def check_tiling(
    key: str, shape: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]], source: str
) -> None:
    """Raise naming ``key`` unless the (offsets, sizes) chunks partition ``shape``."""
    for offsets, sizes in chunks:
        if len(offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise CheckpointError(
                f"{source}: chunk at {tuple(offsets)} of size {tuple(sizes)} lies outside {key} {tuple(shape)}"
            )
    if 0 in shape:
        return
    terms: Counter[tuple[tuple[int, int], ...]] = Counter()
    for offsets, sizes in chunks:
        if 0 in sizes:
            continue  # an empty chunk covers nothing
        factors = []  # per cut axis: the (step, sign) pairs of [o, o + s)
        for axis, (o, s, n) in enumerate(zip(offsets, sizes, shape)):
            steps = ([((axis, o), 1)] if o else []) + ([((axis, o + s), -1)] if o + s < n else [])
            if steps and o:
                factors.append(steps)
            elif steps:  # [0, s): the constant minus the step at s
                factors.append([((), 1), *steps])
        if len(factors) > MAX_CUT_AXES:
            raise CheckpointError(f"{source}: a chunk of {key} at {tuple(offsets)} is cut along {len(factors)} axes")
        for product in itertools.product(*factors):
            steps = tuple(step for step, _ in product if step)
            terms[steps] += math.prod(sign for _, sign in product)
    terms[()] -= 1
    if any(terms.values()):
        covered = sum(math.prod(sizes) for _, sizes in chunks)
        problem = "leave a gap (a chunk is missing from the metadata)" if covered < math.prod(shape) else "overlap"
        raise CheckpointError(f"{source}: chunks of {key} {problem}; the checkpoint is inconsistent")
