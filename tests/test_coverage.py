"""Chunk tiling: every grid partition passes; a missing or doubled chunk is named."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offline_bridge.errors import CheckpointError
from offline_bridge.readers.coverage import check_tiling


@st.composite
def partitions(draw):
    shape = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    cuts = [sorted({0, n, *draw(st.lists(st.integers(1, n), max_size=3))}) for n in shape]
    chunks = [
        (tuple(a for a, _ in cell), tuple(b - a for a, b in cell))
        for cell in itertools.product(*[list(itertools.pairwise(c)) for c in cuts])
    ]
    return shape, chunks


@given(partitions())
def test_partitions_pass(case) -> None:
    shape, chunks = case
    check_tiling("k", shape, chunks, "meta")


@given(partitions(), st.data())
def test_gap_and_overlap_are_named(case, data) -> None:
    shape, chunks = case
    victim = data.draw(st.integers(0, len(chunks) - 1))
    with pytest.raises(CheckpointError, match="meta: chunks of k leave a gap"):
        check_tiling("k", shape, chunks[:victim] + chunks[victim + 1 :], "meta")
    with pytest.raises(CheckpointError, match="meta: chunks of k overlap"):
        check_tiling("k", shape, [*chunks, chunks[victim]], "meta")


def test_out_of_bounds_chunk() -> None:
    with pytest.raises(CheckpointError, match="lies outside k"):
        check_tiling("k", (4,), [((0,), (2,)), ((2,), (3,))], "meta")
