"""Costs that could grow faster than the input: chunks repeated through the memo, tilings of many chunks,
parallel sizes claimed by legacy args. Each is refused or checked in time linear in the files."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import assert_refused, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_forgery import copy_example, load_metadata, save_metadata

from offline_bridge.errors import CheckpointError
from offline_bridge.readers.coverage import check_tiling

EMBEDDING = "embedding.word_embeddings.weight"


def test_chunks_repeated_through_the_memo_are_refused(tmp_path: Path) -> None:
    """150,000 chunks in a 300 KB .metadata: one chunk object, memoized, listed over and over."""
    iteration = copy_example(tmp_path)
    metadata = load_metadata(iteration)
    entry = metadata.state_dict_metadata[EMBEDDING]
    entry.chunks = entry.chunks[:1] * 150_000
    save_metadata(iteration, metadata)
    assert (iteration / ".metadata").stat().st_size < 1 << 20
    start = time.monotonic()
    assert "150" in assert_refused(run_cli("inspect", iteration, cwd=iteration.parent.parent), ".metadata", "chunks")
    assert time.monotonic() - start < 30


def test_tiling_of_40000_chunks_takes_linear_time() -> None:
    grid = [((i, j), (1, 1)) for i in range(200) for j in range(200)]
    diagonal = [((i, i), (1, 1)) for i in range(40_000)]
    start = time.monotonic()
    check_tiling("k", (200, 200), grid, "m")
    with pytest.raises(CheckpointError, match="gap"):
        check_tiling("k", (40_000, 40_000), diagonal, "m")
    assert time.monotonic() - start < 10


@st.composite
def tilings(draw: st.DrawFn) -> tuple[tuple[int, ...], list]:
    """Any tiling made by cutting boxes in two along any axis, again and again (not only grids)."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    boxes = [((0,) * len(shape), shape)]
    for _ in range(draw(st.integers(0, 8))):
        index = draw(st.integers(0, len(boxes) - 1))
        offsets, sizes = boxes[index]
        axis = draw(st.integers(0, len(shape) - 1))
        if sizes[axis] < 2:
            continue
        cut = draw(st.integers(1, sizes[axis] - 1))
        low = (*sizes[:axis], cut, *sizes[axis + 1 :])
        high_offsets = (*offsets[:axis], offsets[axis] + cut, *offsets[axis + 1 :])
        high = (*sizes[:axis], sizes[axis] - cut, *sizes[axis + 1 :])
        boxes[index : index + 1] = [(offsets, low), (high_offsets, high)]
    return shape, boxes


def _covers_once(shape: tuple, boxes: list) -> bool:
    hits = np.zeros(shape, dtype=int)
    for offsets, sizes in boxes:
        hits[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] += 1
    return bool((hits == 1).all())


@settings(max_examples=150, deadline=None)
@given(tilings(), st.data())
def test_tiling_agrees_with_counting_every_element(case: tuple, data: st.DataObject) -> None:
    shape, boxes = case
    check_tiling("k", shape, boxes, "m")
    victim = data.draw(st.integers(0, len(boxes) - 1))
    offsets, sizes = boxes[victim]
    moved = tuple(max(0, o - 1) for o in offsets)
    for changed in (
        boxes[:victim] + boxes[victim + 1 :],
        [*boxes, boxes[victim]],
        [*boxes[:victim], (moved, sizes), *boxes[victim + 1 :]],
    ):
        if _covers_once(shape, changed):
            check_tiling("k", shape, changed, "m")
        else:
            with pytest.raises(CheckpointError, match="chunks of k"):
                check_tiling("k", shape, changed, "m")


def test_legacy_parallel_sizes_are_bounded_by_the_rank_files(tmp_path: Path) -> None:
    """TP = PP = 100000 claimed by the args of a single rank file: refused before anything is sized by it."""
    rank = tmp_path / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    args = argparse.Namespace(tensor_model_parallel_size=100_000, pipeline_model_parallel_size=100_000, num_layers=1)
    torch.save({"args": args, "model": {"x": torch.zeros(2)}}, rank / "model_optim_rng.pt")
    line = assert_refused(run_cli("inspect", tmp_path / "iter_0000001", cwd=tmp_path), "model_optim_rng.pt")
    assert "tensor_model_parallel_size=100000" in line
