"""Legacy saves with expert TP 1 under TP2 EP2 (issue 20): Megatron-LM writes one file per rank of expert-data-
parallel rank 0, `mp_rank_00_000` and `mp_rank_01_001`, not the TP x EP grid. Each TP rank's dense shards and
each EP rank's whole experts are taken from the file that holds them; the output is byte for byte the
torch_dist twin's and the logits are Megatron's. A stage missing a TP or EP rank is refused, naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from judge import assert_matches_megatron, assert_same_output, convert_fails

from offline_bridge import convert
from tools.legacy_fixtures import EXPERT_TP1_SPEC
from tools.megatron_fixtures import build_fixtures, legacy_root


@pytest.fixture(scope="module")
def root(megatron_cache: Path) -> Path:
    return build_fixtures([EXPERT_TP1_SPEC], megatron_cache)[EXPERT_TP1_SPEC]


def test_converts_like_the_torch_dist_twin(root: Path, tmp_path: Path) -> None:
    legacy = legacy_root(root)
    assert sorted(p.name for p in (legacy / "iter_0000010").iterdir()) == ["mp_rank_00_000", "mp_rank_01_001"]
    ours = convert(legacy, tmp_path / "legacy", progress=False)
    assert_same_output(ours, convert(root, tmp_path / "dist", progress=False))
    assert_matches_megatron(ours, EXPERT_TP1_SPEC, root)


def test_a_missing_rank_is_named(root: Path, tmp_path: Path) -> None:
    legacy = Path(shutil.copytree(legacy_root(root), tmp_path / "legacy"))
    shutil.rmtree(legacy / "iter_0000010" / "mp_rank_01_001")
    shutil.copytree(legacy / "iter_0000010" / "mp_rank_00_000", legacy / "iter_0000010" / "mp_rank_00_001")
    assert "no rank file of pipeline stage 0 holds TP ranks [1]" in convert_fails(legacy, tmp_path / "out")
