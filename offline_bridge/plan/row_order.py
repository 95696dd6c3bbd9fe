"""The one place tensor-parallel row orders are undone: a `RowOrder` (reported by a reader, e.g. a legacy fc1's
rank-major rows, or implied by a rule's layout) as the permutation from a source's rows in true order to the
rows they are stored at. Reading a source (`transform.compute.read_source`) and
copying its rows file to file (`transfer`) both go through it, so merges, quantizer state and adapter export
never see a TP order."""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from ..readers.base import RowOrder
from .schema import Source

__all__ = ["stored_rows"]


def _permutation(order: RowOrder, rows: np.ndarray) -> np.ndarray:
    tp = order.tp
    if order.parts and order.kind != "tp_blocks":  # consecutive blocks, each in the order on its own
        blocks = np.split(rows, np.cumsum(order.parts)[:-1])
        return np.concatenate([_permutation(RowOrder(order.kind, tp), block) for block in blocks])
    if order.kind == "swiglu":  # rank t's halves at blocks t and tp + t
        blocks = np.split(rows, 2 * tp)
        return np.concatenate([blocks[i] for r in range(tp) for i in (r, tp + r)])
    if order.kind == "rank_major_gated":  # [gate_0, up_0, gate_1, up_1, ...] → [gate; up]
        blocks = np.split(rows, 2 * tp)
        return np.concatenate(blocks[0::2] + blocks[1::2])
    if order.kind == "tp_blocks":  # per rank its slice of every piece → piece by piece
        local = [n // tp for n in order.parts]
        ranks = [np.split(block, np.cumsum(local)[:-1]) for block in np.split(rows, tp)]
        return np.concatenate([pieces[j] for j in range(len(local)) for pieces in ranks])
    raise CheckpointError(f"unknown row order {order.kind!r}")


def stored_rows(source: Source) -> np.ndarray | None:
    """For each row of ``source`` in true order, the row it is stored at; None when stored in true order."""
    order = source.row_order
    if order is None:
        return None
    rows = source.shape[0]
    pieces = order.parts or (rows,)
    blocks = 2 * order.tp if order.kind != "tp_blocks" else order.tp
    if sum(pieces) != rows or any(n % blocks for n in pieces):
        raise CheckpointError(
            f"{source.key}: {rows} rows in pieces of {list(pieces)} cannot be split over TP {order.tp} "
            f"({order.kind.replace('_', ' ')} order)"
        )
    return _permutation(order, np.arange(rows, dtype=np.int64))
