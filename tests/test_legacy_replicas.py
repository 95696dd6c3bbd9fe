"""A real legacy save whose replicated tensor differs between TP ranks (issue 20): TP rank 0's copy is taken, as
Megatron does, with one warning naming the file, the tensor and the largest difference; `--strict` refuses."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LEGACY_SPECS
from judge import assert_same_output, convert_fails

from offline_bridge import convert
from tools.megatron_fixtures import legacy_root

RANK_FILE = "iter_0000010/mp_rank_01_000/model_optim_rng.pt"  # TP rank 1 of stage 0 (TP2 PP2 VPP2)
CHUNK, NAME = "model1", "decoder.layers.0.self_attention.q_layernorm.weight"  # global layer 2: replicated
DELTA = 0.25


@pytest.fixture
def diverged(checkpoints: dict, tmp_path: Path) -> tuple[Path, Path]:
    """(the untouched legacy save, a copy with NAME perturbed on TP rank 1)."""
    original = legacy_root(checkpoints[LEGACY_SPECS[0]])
    copy = Path(shutil.copytree(original, tmp_path / "diverged"))
    state = torch.load(copy / RANK_FILE, weights_only=False)  # our own fixture: trusted here
    state[CHUNK][NAME][3] += DELTA
    torch.save(state, copy / RANK_FILE)
    return original, copy


def test_rank_zero_copy_with_one_warning(
    diverged: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original, copy = diverged
    with caplog.at_level(logging.WARNING):
        ours = convert(copy, tmp_path / "diverged-hf", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "differs" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert RANK_FILE.split("/", 1)[1] in warnings[0] and NAME in warnings[0]
    assert "largest absolute difference 0.25" in warnings[0]
    assert_same_output(ours, convert(original, tmp_path / "original-hf", progress=False))


def test_strict_refuses(diverged: tuple[Path, Path], tmp_path: Path) -> None:
    _, copy = diverged
    line = convert_fails(copy, tmp_path / "out", "--strict")
    assert RANK_FILE.split("/", 1)[1] in line and NAME in line and "replicated" in line
