"""Steps that only move bytes, planned as copies between files: which byte ranges of which checkpoint files
make up each HF tensor.

A step qualifies when its rule only picks rows (`Rule.rows_only`), nothing is merged or cast, and the reader
says where every chunk lies (`CheckpointReader.extents`). Tensors are seen as 2-D, rows (the first kept axis)
× the rest flattened: a chunk then holds a block of rows and a range of those columns, its rows one after the
other in its file. Which source rows each target takes comes from the rule itself, applied to the row
numbers. A chunk spanning all columns gives one run per row block; a chunk holding a column range (a
row-parallel weight) gives one run of equally spaced pieces.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import InternalError
from ..readers.base import Extent
from .extent_index import ExtentIndex
from .row_order import stored_rows
from .rules import Dims
from .rules.registry import rule_of
from .schema import Source, Step

__all__ = ["Run", "plan_runs", "selected_rows"]


@dataclass(frozen=True)
class Run:
    """``count`` pieces of ``length`` bytes, consecutive in file ``path`` from byte ``src``, placed ``stride``
    bytes apart from byte ``dst`` of the target tensor."""

    path: str
    src: int
    dst: int
    length: int
    count: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.length * self.count


@dataclass(frozen=True)
class _Piece:
    """Rows ``[first, stop)`` of a source part held by one chunk: their bytes from ``src`` in ``path`` (one
    row after the other), each landing ``column`` bytes into its target row."""

    path: str
    src: int
    first: int
    stop: int
    column: int
    length: int  # bytes of one row in this chunk


def plan_runs(step: Step, extents: ExtentIndex, dims: Dims) -> list[list[Run]] | None:
    """Per target of ``step``, the runs making up its bytes in order; None when the step must be computed."""
    source = step.source
    if step.delta is not None or any(target.dtype != source.dtype for target in step.targets):
        return None
    selected = selected_rows(step, dims, stored=True)
    if selected is None:
        return None
    parts = []
    for key, box in source.parts:
        part = _pieces(extents, key, box, source)
        if part is None:
            return None
        parts.append(part)
    row_bytes = source.dtype.itemsize * int(np.prod(source.shape[1:], dtype=np.int64))
    firsts = list(itertools.accumulate((rows for rows, _ in parts), initial=0))  # each part's first source row
    plans = []
    for target, rows in zip(step.targets, selected):
        runs: list[Run] = []
        at = 0  # target row
        for start, stop in rows:
            for index, (_, pieces) in enumerate(parts):
                lo, hi = max(start, firsts[index]), min(stop, firsts[index + 1])
                if lo < hi:
                    runs += _runs(pieces, lo - firsts[index], hi - firsts[index], at + lo - start, row_bytes)
            at += stop - start
        if sum(run.nbytes for run in runs) != target.nbytes:
            raise InternalError(f"internal error: the byte runs of {target.name} do not add up to its size")
        plans.append(runs)
    return plans


def selected_rows(step: Step, dims: Dims, *, stored: bool = False) -> list[list[tuple[int, int]]] | None:
    """Per target, the source row ranges it takes, in order: the rule applied to the row numbers (with
    ``stored``, the rows as stored, TP order included; else as read); None unless the rule only picks rows."""
    rule = rule_of(step.rule)
    if not rule.rows_only or not step.source.shape:
        return None
    rows = step.source.shape[0]
    numbers = stored_rows(step.source) if stored else None
    numbers = np.arange(rows, dtype=np.int64) if numbers is None else numbers
    picked = rule.apply(numbers.reshape(rows, 1), dims)
    result = []
    for target, out in zip(step.targets, picked, strict=True):
        if not target.shape or out.shape != (target.shape[0], 1) or target.shape[1:] != step.source.shape[1:]:
            return None
        numbers = np.asarray(out[:, 0])
        breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
        starts = np.concatenate([[0], breaks]).astype(np.int64)
        stops = np.concatenate([breaks, [len(numbers)]]).astype(np.int64)
        result.append([(int(numbers[a]), int(numbers[b - 1]) + 1) for a, b in zip(starts, stops) if b > a])
    return result


def _pieces(
    index: ExtentIndex, key: str, box: tuple[tuple[int, int], ...], source: Source
) -> tuple[int, list[_Piece]] | None:
    """A source part's row count and the chunks holding its rows, or None if a chunk is not a row block ×
    column range (then the step is computed)."""
    lead = len(box) - len(source.shape)  # stacked axes (layer, expert), one index each
    extents = index.overlapping(key, box, lead)
    if extents is None:
        return None
    itemsize = source.dtype.itemsize
    inner = int(np.prod([b - a for a, b in box[lead + 2 :]], dtype=np.int64))
    pieces = []
    for extent in extents:
        overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, extent.box)]
        if any(lo >= hi for lo, hi in overlap):
            continue
        columns = overlap[lead + 1 : lead + 2]
        if columns != list(extent.box[lead + 1 : lead + 2]) or list(extent.box[lead + 2 :]) != list(box[lead + 2 :]):
            return None  # the chunk's rows are not whole column ranges of the target's rows
        strides = _element_strides(extent)
        element = sum((o[0] - e[0]) * s for o, e, s in zip(overlap, extent.box, strides))
        column = (columns[0][0] - box[lead + 1][0]) * inner if columns else 0
        first, stop = overlap[lead]
        pieces.append(
            _Piece(
                extent.path,
                extent.offset + element * itemsize,
                first - box[lead][0],
                stop - box[lead][0],
                column * itemsize,
                strides[lead] * itemsize,
            )
        )
    return box[lead][1] - box[lead][0], pieces


def _element_strides(extent: Extent) -> list[int]:
    strides, step = [], 1
    for n in reversed(extent.shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _runs(pieces: list[_Piece], start: int, stop: int, at: int, row_bytes: int) -> list[Run]:
    """Runs for part rows ``[start, stop)`` landing from target row ``at``, in target byte order."""
    runs = []
    for piece in sorted(pieces, key=lambda p: (p.first, p.column)):
        lo, hi = max(start, piece.first), min(stop, piece.stop)
        if lo >= hi:
            continue
        src = piece.src + (lo - piece.first) * piece.length
        dst = (at + lo - start) * row_bytes + piece.column
        if piece.length == row_bytes:
            runs.append(Run(piece.path, src, dst, (hi - lo) * row_bytes))
        else:
            runs.append(Run(piece.path, src, dst, piece.length, hi - lo, row_bytes))
    return runs
