"""Plain PyTorch DCP (`torch_dcp`) of a megatron-core state dict, and format auto-detection."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from conftest import DCP_SPEC
from judge import assert_matches_megatron, assert_same_output

from offline_bridge import convert
from offline_bridge.commands.cli import main
from tools.megatron_fixtures import dcp_root


def test_torch_dcp_equals_torch_dist_twin(checkpoints: dict, tmp_path: Path) -> None:
    root = dcp_root(checkpoints[DCP_SPEC])
    assert not (root / "iter_0000010" / "metadata.json").exists()  # detected from .metadata alone
    ours = convert(root, tmp_path / "dcp", progress=False)
    twin = convert(checkpoints[DCP_SPEC], tmp_path / "dist", progress=False)
    assert_same_output(ours, twin)
    assert_matches_megatron(ours, DCP_SPEC, checkpoints[DCP_SPEC])


def test_unknown_format_lists_what_was_found(tmp_path: Path) -> None:
    iteration = tmp_path / "ckpt" / "iter_0000003"
    iteration.mkdir(parents=True)
    (iteration / "weights.bin").write_bytes(b"\0")
    (iteration / "notes.txt").write_text("?")
    result = CliRunner().invoke(main, ["convert", str(iteration.parent), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "unsupported checkpoint format (notes.txt, weights.bin)" in result.stderr
    assert not (tmp_path / "out").exists()
