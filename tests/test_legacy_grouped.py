"""Legacy rank files of megatron-core 0.16's non-TE `GroupedMLP` (`mlp.experts.weight1` / `weight2`, TP2 EP2,
expert TP 2), written by `tools.legacy_fixtures` from the SequentialMLP save of the same weights: the output is
byte for byte that save's conversion and the logits are Megatron's (SequentialMLP's forward, which GroupedMLP's
equals on the same weights; see the fixture writer)."""

from __future__ import annotations

from pathlib import Path

import torch
from judge import assert_matches_megatron, assert_same_output

from offline_bridge import convert
from offline_bridge.readers import LegacyReader
from offline_bridge.readers.base import RowOrder
from tools.legacy_fixtures import GROUPED_SPEC, build_grouped
from tools.megatron_fixtures import build_fixtures


def test_grouped_mlp_equals_sequential_mlp_save(megatron_cache: Path, tmp_path: Path) -> None:
    root = build_fixtures([GROUPED_SPEC], megatron_cache)[GROUPED_SPEC]
    grouped = build_grouped(megatron_cache, GROUPED_SPEC, root)
    state = torch.load(grouped / "iter_0000010/mp_rank_01_001/model_optim_rng.pt", weights_only=False)  # ours
    assert state["model"]["decoder.layers.0.mlp.experts.weight1"].shape == (64, 2 * 2 * 32 // 2)  # [H, E_local·2I/etp]
    assert not any("local_experts" in k for k in state["model"])
    with LegacyReader(grouped / "iter_0000010") as reader:  # served per expert, fc1 rank-major over expert TP
        info = reader.tensors["decoder.layers.0.mlp.experts.3.linear_fc1.weight"]
        assert info.shape == (64, 64) and info.row_order == RowOrder("rank_major_gated", 2)
    ours = convert(grouped, tmp_path / "grouped", progress=False)
    assert_same_output(ours, convert(root, tmp_path / "sequential", progress=False))
    assert_matches_megatron(ours, GROUPED_SPEC, root)
