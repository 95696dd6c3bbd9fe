"""A legacy gated fc1 keeps its rank-major rows and says so (`TensorInfo.row_order`, issue 17): the reader
neither reorders nor splits it, the plan's source carries the order, and reading the source undoes it, for one
tensor and for every expert packed into one (forged TP2 rank files, no megatron-core)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from offline_bridge.plan.row_order import stored_rows
from offline_bridge.plan.rules import Copy
from offline_bridge.plan.sources import finder, resolve
from offline_bridge.readers import LegacyReader
from offline_bridge.readers.base import RowOrder
from offline_bridge.transform.compute import read_source

FC1 = "decoder.layers.0.mlp.linear_fc1.weight"
EXPERT_FC1 = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
DIMS = SimpleNamespace(num_layers=1, num_experts=2)


def _rank_files(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """TP2 rank files, each with its [gate_t; up_t] fc1 rows (distinct values per row) and two experts'."""
    args = argparse.Namespace(tensor_model_parallel_size=2, swiglu=True, num_layers=1, num_experts=2)
    rows = [torch.arange(t * 12, (t + 1) * 12, dtype=torch.float32).reshape(4, 3) for t in range(2)]
    for t, local in enumerate(rows):
        experts = {EXPERT_FC1.format(e): local + 100 * (e + 1) for e in range(2)}
        directory = tmp_path / "iter_0000001" / f"mp_rank_{t:02d}"
        directory.mkdir(parents=True)
        torch.save({"args": args, "model": {FC1: local, **experts}}, directory / "model_optim_rng.pt")
    return tmp_path / "iter_0000001", [r.numpy() for r in rows]


def _true(stored: np.ndarray) -> np.ndarray:
    """[gate_0; up_0; gate_1; up_1] (2 rows each) → [gate_0; gate_1; up_0; up_1]."""
    return stored[[0, 1, 4, 5, 2, 3, 6, 7]]


def test_rank_major_rows_as_stored(tmp_path: Path) -> None:
    directory, rows = _rank_files(tmp_path)
    stored = np.concatenate(rows)
    with LegacyReader(directory) as reader:
        info = reader.tensors[FC1]
        assert (info.shape, info.row_order) == ((8, 3), RowOrder("rank_major_gated", 2))
        assert np.array_equal(reader.read(FC1), stored)
        assert [e.box for e in reader.extents(FC1)] == [((0, 4), (0, 3)), ((4, 8), (0, 3))]  # one per shard
        source = finder(reader, {"i": 0}, DIMS)((FC1.replace(".0.", ".{i}."),))
        assert source.row_order == info.row_order
        assert np.array_equal(read_source(reader, source), _true(stored))


def test_packed_experts_keep_each_experts_order(tmp_path: Path) -> None:
    directory, rows = _rank_files(tmp_path)
    rule = Copy.of("decoder.layers.{i}.mlp.experts.{e}.linear_fc1.weight", "packed.{i}")
    with LegacyReader(directory) as reader:
        source = resolve(reader, rule, {"i": 0}, DIMS)
        assert source.row_order == RowOrder("rank_major_gated", 2, (8, 8))
        expected = [_true(np.concatenate(rows) + 100 * (e + 1)) for e in range(2)]
        assert np.array_equal(read_source(reader, source), np.concatenate(expected))
        assert stored_rows(source).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
