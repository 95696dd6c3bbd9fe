"""Bad input: one line on stderr naming the file or tensor, exit code 2, and no output left behind."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PARITY_SPECS
from judge import convert_fails

from offline_bridge.commands.cli import main

SPEC = next(s for s in PARITY_SPECS if (s.family, s.tp, s.pp, s.dtype) == ("llama", 2, 2, "fp32") and not s.tied)
QKV = "decoder.layers.self_attention.linear_qkv.weight"


@pytest.fixture
def ckpt(checkpoints: dict, tmp_path: Path) -> Path:
    """A private copy of a TP2 PP2 save root that a test may damage."""
    return Path(shutil.copytree(checkpoints[SPEC], tmp_path / "ckpt"))


def iteration_dir(root: Path) -> Path:
    return root / "iter_0000010"


def test_missing_directory(tmp_path: Path) -> None:
    line = convert_fails(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in line and "does not exist" in line


def test_unknown_iteration(ckpt: Path, tmp_path: Path) -> None:
    line = convert_fails(ckpt, tmp_path / "out", "--iteration", "99")
    assert "iteration 99 not found" in line and "iterations present: 10" in line


def test_truncated_distcp(ckpt: Path, tmp_path: Path) -> None:
    shard = iteration_dir(ckpt) / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    line = convert_fails(ckpt, tmp_path / "out")
    assert "__0_0.distcp" in line and "truncated" in line


def test_chunk_missing_from_metadata(ckpt: Path, tmp_path: Path) -> None:
    metadata_file = iteration_dir(ckpt) / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own fixture: trusted here
    metadata.state_dict_metadata[QKV].chunks.pop()
    metadata_file.write_bytes(pickle.dumps(metadata))
    line = convert_fails(ckpt, tmp_path / "out")
    assert QKV in line and "gap" in line


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker would put in a checkpoint
        return (os.system, (f"touch {self.marker}",))


def test_metadata_with_code_payload_is_refused(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (iteration_dir(ckpt) / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    line = convert_fails(ckpt, tmp_path / "out")
    assert ".metadata" in line and "refusing to unpickle" in line and "system" in line
    assert not marker.exists()


def test_common_pt_with_code_payload_is_refused(ckpt: Path, tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    torch.save({"args": _Payload(marker)}, iteration_dir(ckpt) / "common.pt")
    line = convert_fails(ckpt, tmp_path / "out")
    assert "common.pt" in line and "refusing to unpickle" in line
    assert not marker.exists()


def test_non_empty_output_directory(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--quiet"])
    assert result.exit_code == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 2 and "holds keep.txt" in result.stderr  # not recognisably an output: kept
    assert (out / "keep.txt").read_text() == "mine"


def test_wrong_model_type_drops_nothing_silently(ckpt: Path, tmp_path: Path, checkpoints: dict) -> None:
    """A qwen2 checkpoint forced through the llama table would lose its qkv biases: refused."""
    qwen2 = next(s for s in PARITY_SPECS if s.family == "qwen2")
    line = convert_fails(checkpoints[qwen2], tmp_path / "out", "--model-type", "llama")
    assert "linear_qkv.bias" in line and "--model-type" in line
