"""`diff`: HF directories and Megatron checkpoints compared by HF tensor, with exit code 0 only when equal
within tolerance; the perturbed copies here are written by safetensors itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BASE_SPEC, LEGACY_SPECS, ROOT
from safetensors.numpy import load_file, save_file

from offline_bridge import convert
from offline_bridge.commands.cli import main
from tools.megatron_fixtures import legacy_root

NAME = "model.layers.1.mlp.down_proj.weight"


def _diff(a: Path, b: Path, *options: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["diff", str(a), str(b), "--json", *options])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def converted(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(checkpoints[BASE_SPEC], tmp_path_factory.mktemp("diff") / "hf", progress=False)


def _perturbed(converted: Path, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the converted model with the tensors rewritten by safetensors after ``change``."""
    copy = Path(shutil.copytree(converted, tmp_path / "copy"))
    tensors = load_file(copy / "model.safetensors")
    change(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_output_equals_its_checkpoint(converted: Path, checkpoints: dict) -> None:
    code, report = _diff(converted, checkpoints[BASE_SPEC])
    assert code == 0 and report["equal"]
    assert report["counts"] == {"equal": len(load_file(converted / "model.safetensors"))}


def test_resharded_and_legacy_saves_equal(checkpoints: dict, base_tp2pp2: Path) -> None:
    assert _diff(base_tp2pp2, checkpoints[BASE_SPEC])[0] == 0
    spec = LEGACY_SPECS[0]
    assert _diff(legacy_root(checkpoints[spec]), checkpoints[spec])[0] == 0


def test_perturbed_tensor_is_named(converted: Path, tmp_path: Path) -> None:
    def nudge(tensors: dict) -> None:
        tensors[NAME] = tensors[NAME].copy()
        tensors[NAME][3, 5] += 1e-3

    copy = _perturbed(converted, tmp_path, nudge)
    code, report = _diff(converted, copy)
    assert code == 1 and report["counts"]["different"] == 1
    (found,) = [t for t in report["tensors"] if t["status"] != "equal"]
    assert found["name"] == NAME and found["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert _diff(converted, copy, "--atol", "2e-3")[0] == 0  # within tolerance: "close"
    result = CliRunner().invoke(main, ["diff", str(converted), str(copy)])
    assert result.exit_code == 1 and f"different {NAME}" in result.stdout


def test_missing_extra_dtype_and_shape(converted: Path, tmp_path: Path) -> None:
    def damage(tensors: dict) -> None:
        tensors["extra.weight"] = tensors.pop(NAME)
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
        tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]

    code, report = _diff(converted, _perturbed(converted, tmp_path, damage))
    status = {t["name"]: t["status"] for t in report["tensors"] if t["status"] != "equal"}
    assert code == 1
    assert status == {NAME: "missing", "extra.weight": "extra", "model.norm.weight": "dtype", "lm_head.weight": "shape"}


def test_broken_header_is_bad_input(converted: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(converted, tmp_path / "copy"))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")  # a header longer than the file
    (copy / "model.safetensors").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["diff", str(converted), str(copy)])
    assert result.exit_code == 2 and "model.safetensors" in result.stderr and "header length" in result.stderr


def test_inspect_diff_and_verify_never_import_torch(converted: Path, checkpoints: dict) -> None:
    code = (
        "import sys; from offline_bridge.commands.diff import diff; from offline_bridge.commands.inspection import inspect_checkpoint; "
        "from offline_bridge.write.manifest import verify; "
        f"inspect_checkpoint({str(checkpoints[BASE_SPEC])!r}); assert not verify({str(converted)!r}); "
        f"assert all(r.status == 'equal' for r in diff({str(converted)!r}, {str(checkpoints[BASE_SPEC])!r})); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr


def test_single_files(converted: Path, tmp_path: Path) -> None:
    def rename(tensors: dict) -> None:
        tensors["model.norm.weight.renamed"] = tensors.pop("model.norm.weight")

    copy = _perturbed(converted, tmp_path, rename)
    code, report = _diff(converted / "model.safetensors", copy / "model.safetensors")
    assert code == 1 and report["counts"] == {"equal": len(report["tensors"]) - 2, "missing": 1, "extra": 1}
