"""The pipeline's execution: --dry-run plans without reading tensor data; threads, open-file limits and merge
block sizes never change a byte of the output."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CANONICAL_SPECS, DORA_SPEC, LORA_SPECS, PARITY_SPECS
from safetensors import safe_open

from offline_bridge import convert
from offline_bridge.commands.cli import main
from offline_bridge.families import family_by_name
from offline_bridge.files import posix_io
from offline_bridge.transform import lora_merge
from offline_bridge.write import scheduler, writer
from tools.lora_fixtures import AdapterSpec

SPEC = next(s for s in PARITY_SPECS if s.family == "qwen3" and s.tp == 2 and s.pp == 2 and s.dtype == "bf16")
FP32_SPEC = next(s for s in PARITY_SPECS if s.family == "qwen2" and s.tp == 2 and s.pp == 2 and s.dtype == "fp32")


def _metadata_only(save_root: Path, into: Path) -> Path:
    """A copy of a checkpoint whose tensor data files are empty: only metadata can be read from it."""
    shutil.copytree(save_root, into)
    for shard in into.rglob("*.distcp"):
        shard.write_bytes(b"")
    return into


def test_dry_run_prints_the_plan_without_reading_tensor_data(checkpoints: dict, tmp_path: Path) -> None:
    hollow = _metadata_only(checkpoints[SPEC], tmp_path / "hollow")
    out = tmp_path / "hf"
    options = ["--max-shard-size", "200KB", "--quiet"]
    result = CliRunner().invoke(main, ["convert", str(hollow), str(out), "--dry-run", *options])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    printed = result.stdout.splitlines()
    real = convert(checkpoints[SPEC], tmp_path / "real", max_shard_size="200KB", progress=False)
    files = sorted(real.glob("*.safetensors"))
    assert len(files) > 1
    expected, total = [], 0
    for file in files:
        with safe_open(file, "np") as f:
            names = list(f.keys())
        header_size = int.from_bytes(file.read_bytes()[:8], "little") + 8
        offsets = _data_offsets(file)
        for name in names:
            begin, end = offsets[name]
            expected.append((name, file.name, header_size + begin, end - begin))
            total += end - begin
        assert f"file {file.name}: {len(names)} tensors, {file.stat().st_size} bytes" in printed
    listed = []
    for line in printed:
        if "\t" in line:
            name, _, place, nbytes, _ = line.split("\t")
            file, offset = place.split("@")
            listed.append((name, file, int(offset), int(nbytes)))
    assert sorted(listed) == sorted(expected)
    assert printed[-1] == f"total: {len(expected)} tensors, {len(files)} files, {total} bytes"
    family = family_by_name(SPEC.family)
    rules = [line for line in printed if line.startswith("rule ")]
    assert printed[0] == f"family {family.name}: {family.architecture}"
    assert len(rules) == len(family.describe()) and any("<- embedding.word_embeddings.weight" in r for r in rules)
    failed = CliRunner().invoke(main, ["convert", str(hollow), str(out), *options])
    assert failed.exit_code == 2  # the data really is missing: only the dry run gets through


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    import json

    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("spec, dtype", [(SPEC, "auto"), (FP32_SPEC, "bf16")], ids=["copied", "cast"])
def test_workers_and_file_limits_give_identical_bytes(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: object, dtype: str
) -> None:
    """One thread, or three threads with a single open file of each kind at a time and writes cut into odd
    small calls of a few buffers each: the same files."""
    fds_before = len(os.listdir("/proc/self/fd"))
    one = convert(checkpoints[spec], tmp_path / "one", dtype=dtype, max_shard_size="100KB", workers=1, progress=False)
    monkeypatch.setattr(writer, "MAX_OPEN_FILES", 1)
    monkeypatch.setattr(scheduler, "MIN_BUDGET", 1)  # steps wait for each other's memory too
    monkeypatch.setattr(posix_io, "_WRITE_CHUNK", 1000)
    monkeypatch.setattr(posix_io, "_IOV_MAX", 3)
    three = convert(
        checkpoints[spec], tmp_path / "three", dtype=dtype, max_shard_size="100KB", workers=3, progress=False
    )
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every file closed again
    names = sorted(p.name for p in one.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    assert names == sorted(p.name for p in three.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (three / name).read_bytes(), name


@pytest.mark.parametrize("spec", [LORA_SPECS[0], DORA_SPEC, CANONICAL_SPECS[0]], ids=["lora", "dora", "canonical"])
def test_merges_in_row_blocks(
    adapters: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: AdapterSpec
) -> None:
    """A merge worked through one row at a time gives the same bytes on one thread or three, and the values of
    the merge in one block (which test_lora compares bit for bit with W + s·B@A) up to the rounding of B@A;
    on a machine without a GPU the GPU module stays unloaded."""
    import torch
    from safetensors.torch import load_file

    adapter = adapters[spec]
    monkeypatch.delitem(sys.modules, "offline_bridge.transform.gpu", raising=False)  # loaded by test_package
    whole = load_file(convert(adapter, tmp_path / "whole", progress=False) / "model.safetensors")
    monkeypatch.setattr(lora_merge, "ROW_BLOCK", 1)
    one = convert(adapter, tmp_path / "one", workers=1, progress=False) / "model.safetensors"
    three = convert(adapter, tmp_path / "three", workers=3, progress=False) / "model.safetensors"
    assert one.read_bytes() == three.read_bytes()
    rows = load_file(one)
    assert rows.keys() == whole.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(rows[name].float(), tensor.float(), rtol=2**-7, atol=1e-6, msg=name)
    assert "offline_bridge.transform.gpu" not in sys.modules
