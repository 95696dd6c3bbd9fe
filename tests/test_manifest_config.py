"""The manifest says where the model configuration came from (issue 15): kind and file, relative to the source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offline_bridge.commands.convert import convert
from offline_bridge.write.manifest import MANIFEST

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama"
BRIDGE_BASE = REPO / "tests" / "data" / "bridge" / "dense" / "base"


def _sources(out: Path) -> list[dict]:
    return json.loads((out / MANIFEST).read_text())["sources"]


def test_config_from_the_checkpoint_args(tmp_path: Path) -> None:
    (source,) = _sources(convert(EXAMPLE, tmp_path / "out", progress=False))
    assert source["config"] == {"kind": "common.pt args", "file": "common.pt"}


def test_config_from_a_bridge_run_config(tmp_path: Path) -> None:
    (source,) = _sources(convert(BRIDGE_BASE, tmp_path / "out", progress=False))
    assert source["config"] == {"kind": "run_config.yaml model:", "file": "run_config.yaml"}


def test_config_from_hf_config(tmp_path: Path) -> None:
    first = convert(EXAMPLE, tmp_path / "first", progress=False)
    checkpoint, given = _sources(convert(EXAMPLE, tmp_path / "out", hf_config=first / "config.json", progress=False))
    assert "config" not in checkpoint
    assert given["config"] == {"kind": "--hf-config", "file": "config.json"}


@pytest.mark.parametrize("example", [EXAMPLE, BRIDGE_BASE], ids=["args", "run-config"])
def test_manifest_does_not_depend_on_where_the_checkpoint_lies(example: Path, tmp_path: Path) -> None:
    here = shutil.copytree(example, tmp_path / "a" / "ckpt")
    there = shutil.copytree(example, tmp_path / "elsewhere" / "deeper" / "ckpt")
    one = convert(here, tmp_path / "one", progress=False)
    two = convert(there, tmp_path / "two", progress=False)
    assert (one / MANIFEST).read_bytes() == (two / MANIFEST).read_bytes()
