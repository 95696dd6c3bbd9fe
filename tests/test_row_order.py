"""TP row orders, declared once (`Source.row_order`): the permutations against hand-worked cases, refused when
the rows do not split, and applied alike by a read and by a file-to-file copy's row selection."""

from __future__ import annotations

import numpy as np
import pytest

from offline_bridge.dtypes import FLOAT32
from offline_bridge.errors import CheckpointError
from offline_bridge.plan.row_order import stored_rows
from offline_bridge.plan.rules import Dims, GatedMLP
from offline_bridge.plan.rules.registry import rule_ref
from offline_bridge.plan.schema import Source, Step, Target
from offline_bridge.plan.transfer import selected_rows
from offline_bridge.readers.base import RowOrder

DIMS = Dims(1, 4, 1, 1, 4, 8, False)


def _source(rows: int, order: RowOrder | None) -> Source:
    return Source((("w", ((0, rows), (0, 4))),), (rows, 4), FLOAT32, "w", order)


@pytest.mark.parametrize(
    ("order", "rows", "expected"),
    [
        # rank t's gate and up halves at blocks t and tp + t of 2·tp
        (RowOrder("swiglu", 3), 6, [0, 3, 1, 4, 2, 5]),
        # [gate_0, up_0, gate_1, up_1, gate_2, up_2] → [gate; up]
        (RowOrder("rank_major_gated", 3), 6, [0, 2, 4, 1, 3, 5]),
        # per rank its slice of pieces of 4 and 2 rows: [p0 r0 (2); p1 r0 (1); p0 r1 (2); p1 r1 (1)]
        (RowOrder("tp_blocks", 2, (4, 2)), 6, [0, 1, 3, 4, 2, 5]),
    ],
)
def test_stored_rows(order: RowOrder, rows: int, expected: list[int]) -> None:
    assert stored_rows(_source(rows, order)).tolist() == expected


def test_true_order_needs_no_permutation() -> None:
    assert stored_rows(_source(6, None)) is None


@pytest.mark.parametrize(
    "order", [RowOrder("swiglu", 2), RowOrder("rank_major_gated", 4), RowOrder("tp_blocks", 2, (3, 3))]
)
def test_rows_that_do_not_split_are_refused(order: RowOrder) -> None:
    with pytest.raises(CheckpointError, match=r"w: 6 rows .* cannot be split over TP"):
        stored_rows(_source(6, order))


def test_a_copy_takes_the_stored_rows_a_read_the_true_ones() -> None:
    """File to file, the rule picks from the rows as stored; after a read (which permutes), as they are."""
    source = _source(8, RowOrder("rank_major_gated", 2))
    rule = GatedMLP.of("w", "gate", "up")
    step = Step(rule_ref(rule), source, (Target("gate", (4, 4), FLOAT32), Target("up", (4, 4), FLOAT32)))
    assert selected_rows(step, DIMS, stored=True) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert selected_rows(step, DIMS) == [[(0, 4)], [(4, 8)]]
    stored = np.arange(8)[:, None] * 10
    true = stored[stored_rows(source)]
    gate, up = rule.apply(true, DIMS)
    assert gate[:, 0].tolist() == [0, 10, 40, 50] and up[:, 0].tolist() == [20, 30, 60, 70]
