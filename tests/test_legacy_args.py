"""Legacy rank files' args go through the args schema before the reader sizes anything by them (issue 16):
a list, bytes or a negative value is one line naming the rank file and the field, exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from hostile import assert_refused, run_cli


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_layers", [1]), ("num_experts", b"\x04"), ("num_layers", -1), ("num_experts", 2.0)],
)
def test_legacy_args_are_checked_by_the_schema(tmp_path: Path, field: str, value: object) -> None:
    rank = tmp_path / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    args = argparse.Namespace(**{"num_layers": 1, "tensor_model_parallel_size": 1, field: value})
    state = {"args": args, "model": {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(2, 2)}}
    torch.save(state, rank / "model_optim_rng.pt")
    line = assert_refused(run_cli("inspect", tmp_path / "iter_0000001", cwd=tmp_path), "model_optim_rng.pt")
    assert field in line
