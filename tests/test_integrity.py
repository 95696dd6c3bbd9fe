"""core 0.18's `integrity.json`: checked before the first output byte, and every input file the manifest
describes is read before it too (issue 20).

The `integrity.json` under tests/data/bridge/dense/ was written by megatron-core 0.19.2's own
`save_integrity_manifest` over the files its `dist_checkpointing.save` writes for the dense Bridge base
(`.metadata`, `__*_0.distcp`, `metadata.json`); Bridge writes `run_config.yaml` and `train_state.pt` after
the save, so they are unlisted, as in a real Bridge save with `verify_integrity`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from offline_bridge import convert
from offline_bridge.commands import convert as convert_module
from offline_bridge.commands.cli import run
from offline_bridge.errors import CheckpointError
from offline_bridge.readers.integrity import check_integrity

DENSE = Path(__file__).resolve().parent / "data" / "bridge" / "dense"
BASE = DENSE / "base" / "iter_0000000"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """The dense Bridge base with megatron-core's `integrity.json` beside its files."""
    directory = tmp_path / "ckpt" / "iter_0000000"
    shutil.copytree(BASE, directory)
    shutil.copy(DENSE / "integrity.json", directory / "integrity.json")
    return directory


@pytest.fixture
def no_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a conversion reaches the writer."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("output written before the input was validated")

    monkeypatch.setattr(convert_module, "write_weights", refuse)


def _convert(directory: Path, out: Path) -> Path:
    return convert(directory, out, hf_config=DENSE / "hf_config" / "config.json", progress=False)


def test_intact_checkpoint_converts_and_the_manifest_pins_integrity_json(checkpoint: Path, tmp_path: Path) -> None:
    assert check_integrity(checkpoint) == 4
    out = _convert(checkpoint, tmp_path / "out")
    plain = _convert(BASE, tmp_path / "plain")
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    files = json.loads((out / "offline-bridge.json").read_text())["sources"][0]["files"]
    assert (
        files["integrity.json"]["sha256"]
        == __import__("hashlib").sha256((checkpoint / "integrity.json").read_bytes()).hexdigest()
    )


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["__1_0.distcp", ".metadata", "metadata.json"])
def test_a_changed_file_is_refused_by_name_before_writing(
    name: str, checkpoint: Path, tmp_path: Path, no_writes: None
) -> None:
    _flip_last_byte(checkpoint / name) if name != "metadata.json" else (checkpoint / name).write_text(
        json.dumps(json.loads((checkpoint / name).read_text())) + " "
    )
    with pytest.raises(CheckpointError, match=rf"{name}: sha256 .* differs from integrity.json"):
        _convert(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_listed_file_that_is_gone_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    listed = json.loads((checkpoint / "integrity.json").read_text())
    listed["files"]["__2_0.distcp"] = "0" * 64
    (checkpoint / "integrity.json").write_text(json.dumps(listed))
    with pytest.raises(CheckpointError, match=r"__2_0.distcp: listed in integrity.json but missing"):
        check_integrity(checkpoint)


def test_the_cli_exits_2_naming_the_file(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _flip_last_byte(checkpoint / "__0_0.distcp")
    code = run(["convert", str(checkpoint), str(tmp_path / "out"), "--hf-config", str(DENSE / "hf_config")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "__0_0.distcp" in lines[0] and "integrity.json" in lines[0], lines
    assert not (tmp_path / "out").exists()


FORGED = [
    ([], "field 'files'"),
    ({"files": ["__0_0.distcp"]}, "field 'files'"),
    ({"algorithm": "md5", "files": {}}, "field 'algorithm'"),
    ({"files": {"../../etc/passwd": "0" * 64}}, "not a file of the checkpoint directory"),
    ({"files": {"/etc/passwd": "0" * 64}}, "not a file of the checkpoint directory"),
    ({"files": {"integrity.json": "0" * 64}}, "not a file of the checkpoint directory"),
    ({"files": {"__0_0.distcp": "ABC"}}, "not a sha256 hex digest"),
    ({"files": {"__0_0.distcp": 7}}, "not a sha256 hex digest"),
]


@pytest.mark.parametrize(("forged", "field"), FORGED)
def test_forged_integrity_json_is_refused_naming_the_field(
    forged: object, field: str, checkpoint: Path, tmp_path: Path, no_writes: None
) -> None:
    (checkpoint / "integrity.json").write_text(json.dumps(forged))
    with pytest.raises(CheckpointError, match=r"integrity\.json") as raised:
        _convert(checkpoint, tmp_path / "out")
    assert field in str(raised.value)


def test_a_listed_fifo_is_refused_not_opened(checkpoint: Path, no_writes: None) -> None:
    listed = json.loads((checkpoint / "integrity.json").read_text())
    os.mkfifo(checkpoint / "pipe")
    listed["files"]["pipe"] = "0" * 64
    (checkpoint / "integrity.json").write_text(json.dumps(listed))
    with pytest.raises(CheckpointError, match="pipe"):
        check_integrity(checkpoint)


def test_every_input_the_manifest_describes_is_read_before_writing(
    checkpoint: Path, tmp_path: Path, no_writes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source fingerprint (it hashes `.metadata`, `common.pt`, `run_config.yaml`, ...) is taken before the
    first output byte: a file it refuses fails the conversion with nothing written."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise CheckpointError("run_config.yaml: refused by the fingerprint")

    monkeypatch.setattr(convert_module, "describe_sources", refuse)
    with pytest.raises(CheckpointError, match="refused by the fingerprint"):
        _convert(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_run_config_is_refused_before_writing(checkpoint: Path, tmp_path: Path, no_writes: None) -> None:
    (checkpoint / "run_config.yaml").unlink()
    os.mkfifo(checkpoint / "run_config.yaml")
    with pytest.raises(CheckpointError, match=r"run_config\.yaml"):
        _convert(checkpoint, tmp_path / "out")
