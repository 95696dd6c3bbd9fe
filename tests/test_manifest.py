"""`offline-bridge.json` and `verify`: the manifest's hashes are those of the tensors safetensors itself
reads back, and any edit to the output is reported."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import BASE_SPEC, LORA_SPECS
from safetensors.numpy import load_file

import offline_bridge
from offline_bridge import convert, export_adapter
from offline_bridge.commands.cli import main
from offline_bridge.write.manifest import MANIFEST
from offline_bridge.write.sources import fingerprint

NAME = "model.layers.2.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def sharded(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(checkpoints[BASE_SPEC], tmp_path_factory.mktemp("manifest") / "hf", max_shard_size="200KB")


def _verify(out: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["verify", str(out)])
    return result.exit_code, (result.stdout + result.stderr).splitlines()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_manifest_describes_the_output(sharded: Path, checkpoints: dict) -> None:
    manifest = json.loads((sharded / MANIFEST).read_text())
    assert manifest["tool"] == {"name": "offline-bridge", "version": offline_bridge.__version__}
    assert manifest["command"] == "convert" and manifest["options"]["max_shard_size"] == "200KB"
    files = sorted(p.name for p in sharded.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and "model.safetensors.index.json" in files and len(files) > 3
    assert manifest["files"]["config.json"]["sha256"] == _sha((sharded / "config.json").read_bytes())
    read_back = {}
    for file in sharded.glob("*.safetensors"):
        read_back.update({name: (file.name, array) for name, array in load_file(file).items()})
    assert sorted(manifest["tensors"]) == sorted(read_back)
    for name, entry in manifest["tensors"].items():
        file, array = read_back[name]
        assert (entry["file"], entry["shape"], entry["sha256"]) == (file, list(array.shape), _sha(array.tobytes()))
    (source,) = manifest["sources"]
    iteration_dir = checkpoints[BASE_SPEC] / "iter_0000010"
    assert (source["role"], source["format"], source["iteration"]) == ("checkpoint", "torch_dist", "10")
    assert source["files"][".metadata"]["sha256"] == _sha((iteration_dir / ".metadata").read_bytes())
    assert source["files"]["common.pt"]["sha256"] == _sha((iteration_dir / "common.pt").read_bytes())
    assert "sha256" not in source["files"]["__0_0.distcp"] and source["args_sha256"]
    assert _verify(sharded) == (0, [f"{sharded}: intact"])


def _tensor_range(out: Path, name: str) -> tuple[Path, int, int]:
    """(file, begin, end) of a tensor, from the manifest and the file's own header length."""
    entry = json.loads((out / MANIFEST).read_text())["tensors"][name]
    file = out / entry["file"]
    start = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    return file, start + entry["data_offsets"][0], start + entry["data_offsets"][1]


def test_verify_reports_every_edit(sharded: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(sharded, tmp_path / "out"))
    file, begin, end = _tensor_range(out, NAME)
    data = bytearray(file.read_bytes())
    data[(begin + end) // 2] ^= 0x01  # one flipped bit
    file.write_bytes(bytes(data))
    (out / "config.json").write_text((out / "config.json").read_text().replace("silu", "gelu"))
    (out / "notes.txt").write_text("added")
    (out / "model.safetensors.index.json").unlink()
    code, lines = _verify(out)
    assert code == 1
    assert lines == [
        "notes.txt: file not in the manifest",
        "config.json: sha256 differs",
        f"{file.name}: tensor {NAME}: sha256 differs",
        "model.safetensors.index.json: missing",
        f"{out}: 4 mismatch(es)",
    ]


def test_verify_truncated_and_unreadable(sharded: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(sharded, tmp_path / "out"))
    file, _, _ = _tensor_range(out, NAME)
    file.write_bytes(file.read_bytes()[:-4])
    code, lines = _verify(out)
    assert code == 1 and lines[0].startswith(f"{file.name}: ") and "bytes, the manifest says" in lines[0]
    (out / MANIFEST).write_text("{not json")
    code, lines = _verify(out)
    assert code == 2 and lines[0].startswith("error: ") and MANIFEST in lines[0]
    (out / MANIFEST).unlink()
    assert _verify(out)[0] == 2


def test_export_adapter_writes_a_manifest(adapters: dict, tmp_path: Path) -> None:
    spec = LORA_SPECS[0]
    out = export_adapter(adapters[spec], tmp_path / "peft", progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "export-adapter"
    assert [s["role"] for s in manifest["sources"]] == ["checkpoint", "base (args only)"]
    assert [s.get("config") for s in manifest["sources"]] == [None, {"kind": "common.pt args", "file": "common.pt"}]
    tensors = load_file(out / "adapter_model.safetensors")
    assert {name: _sha(a.tobytes()) for name, a in tensors.items()} == {
        name: entry["sha256"] for name, entry in manifest["tensors"].items()
    }
    assert _verify(out)[0] == 0


def test_fingerprint_hashes_a_fixed_list_at_fixed_places(tmp_path: Path) -> None:
    """Hashed: the top-level files a reader reads and each array's `.zarray`; everything else, tensor data
    (legacy rank files too) and look-alikes at other depths, by size only."""
    layout = {
        ".metadata": b"m",
        "common.pt": b"c",
        "metadata.json": b"{}",
        "run_config.yaml": b"a: 1",
        "__0_0.distcp": b"d" * 10,
        "mp_rank_00/model_optim_rng.pt": b"w" * 20,
        "key/.zarray": b"{}",
        "key/0.0": b"z" * 4,
        "notes/metadata.json": b"n",
        "notes/config.json": b"n",
        "deep/key/.zarray": b"{}",
        "config.json": b"{}",
    }
    for name, data in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    reader = SimpleNamespace(path=tmp_path, format="zarr", args=None)
    files = fingerprint(reader, "checkpoint")["files"]  # type: ignore[arg-type]
    assert {name: entry["size"] for name, entry in files.items()} == {n: len(d) for n, d in layout.items()}
    hashed = {name: entry["sha256"] for name, entry in files.items() if "sha256" in entry}
    expected = (".metadata", "common.pt", "metadata.json", "run_config.yaml", "key/.zarray")
    assert hashed == {name: _sha(layout[name]) for name in expected}
