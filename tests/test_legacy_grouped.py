"""Legacy rank files of megatron-core 0.16's non-TE `GroupedMLP` (`mlp.experts.weight1` / `weight2`; TP2 EP2 with
expert TP 2 or 1, fp32 and bf16), written by `tools.legacy_fixtures` from the SequentialMLP save of the same
weights: the output is byte for byte that save's conversion and the logits are Megatron's (SequentialMLP's
forward, which GroupedMLP's equals on the same weights: the fixture writer checks it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from judge import assert_matches_megatron, assert_same_output

from offline_bridge import convert
from offline_bridge.readers import LegacyReader
from offline_bridge.readers.base import RowOrder
from tools.legacy_fixtures import GROUPED_SPECS, build_grouped
from tools.megatron_fixtures import FixtureSpec, build_fixtures


@pytest.mark.parametrize("spec", GROUPED_SPECS, ids=lambda s: s.name)
def test_grouped_mlp_equals_sequential_mlp_save(spec: FixtureSpec, megatron_cache: Path, tmp_path: Path) -> None:
    root = build_fixtures([spec], megatron_cache)[spec]
    grouped = build_grouped(megatron_cache, spec, root)
    state = torch.load(grouped / "iter_0000010/mp_rank_01_001/model_optim_rng.pt", weights_only=False)  # ours
    local = spec.num_experts // spec.ep * spec.moe_ffn_hidden_size // spec.etp
    assert state["model"]["decoder.layers.0.mlp.experts.weight1"].shape == (64, 2 * local)  # [H, E_local·2I/etp]
    assert state["model"]["decoder.layers.0.mlp.experts.weight2"].shape == (local, 64)
    assert not any("local_experts" in k for k in state["model"])
    with LegacyReader(grouped / "iter_0000010") as reader:  # served per expert, fc1 rank-major over expert TP
        info = reader.tensors["decoder.layers.0.mlp.experts.3.linear_fc1.weight"]
        order = RowOrder("rank_major_gated", 2) if spec.etp == 2 else None
        assert info.shape == (64, 64) and info.row_order == order
    ours = convert(grouped, tmp_path / "grouped", progress=False)
    assert_same_output(ours, convert(root, tmp_path / "sequential", progress=False))
    assert_matches_megatron(ours, spec, root)
