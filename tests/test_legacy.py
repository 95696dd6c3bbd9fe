"""Legacy `--ckpt-format torch` checkpoints: per-rank files rebuilt into the same bytes as the torch_dist twin."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LEGACY_SPECS
from judge import assert_matches_megatron, assert_same_output, convert_fails

from offline_bridge import convert
from tools.megatron_fixtures import FixtureSpec, legacy_root


@pytest.mark.parametrize("spec", LEGACY_SPECS, ids=lambda s: s.name)
def test_legacy_equals_torch_dist_twin(spec: FixtureSpec, checkpoints: dict, tmp_path: Path) -> None:
    legacy = legacy_root(checkpoints[spec])
    assert list((legacy / "iter_0000010").glob("mp_rank_*/model_optim_rng.pt"))
    ours = convert(legacy, tmp_path / "legacy", progress=False)
    twin = convert(checkpoints[spec], tmp_path / "dist", progress=False)
    assert_same_output(ours, twin)
    assert_matches_megatron(ours, spec, checkpoints[spec])


@pytest.fixture
def legacy(checkpoints: dict, tmp_path: Path) -> Path:
    """A private copy of the TP2 PP2 VPP2 legacy save root that a test may damage."""
    return Path(shutil.copytree(legacy_root(checkpoints[LEGACY_SPECS[0]]), tmp_path / "legacy"))


def test_missing_rank_file(legacy: Path, tmp_path: Path) -> None:
    shutil.rmtree(legacy / "iter_0000010" / "mp_rank_01_001")
    assert "missing rank files for (tp, pp, ep) [(1, 1, 0)]" in convert_fails(legacy, tmp_path / "out")


def test_two_files_claiming_one_rank(legacy: Path, tmp_path: Path) -> None:
    iteration = legacy / "iter_0000010"
    shutil.copytree(iteration / "mp_rank_01_001", iteration / "mp_rank_01_001_000")
    assert "mp_rank_01_001_000" in convert_fails(legacy, tmp_path / "out")


def test_shard_with_wrong_shape(legacy: Path, tmp_path: Path) -> None:
    file = legacy / "iter_0000010" / "mp_rank_01_000" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=False)  # our own fixture: trusted here
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    state["model0"][key] = state["model0"][key][:-8].clone()
    torch.save(state, file)
    line = convert_fails(legacy, tmp_path / "out")
    assert "mp_rank_01_000/model_optim_rng.pt" in line and key in line


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_in_rank_file(legacy: Path, tmp_path: Path) -> None:
    file = legacy / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt"
    torch.save({"args": _Payload(tmp_path / "pwned"), "model0": {}}, file)
    line = convert_fails(legacy, tmp_path / "out")
    assert "mp_rank_00_000/model_optim_rng.pt" in line and "refusing to unpickle" in line
    assert not (tmp_path / "pwned").exists()
