"""`inspect` lists what `convert` refuses in a zarr checkpoint (issue 16): missing or short chunk files and
codecs outside the allow-list, one line each, the same lines `convert` stops at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offline_bridge.commands.cli import run
from offline_bridge.commands.convert import convert
from offline_bridge.commands.inspection import inspect_checkpoint
from offline_bridge.errors import CheckpointError

ZARR = Path(__file__).resolve().parent / "data" / "zarr" / "zarr_ckpt"
OUTPUT, NORM = "output_layer.weight", "decoder.final_layernorm.weight"


def _break(array: Path, how: str) -> None:
    if how == "missing":
        (array / "0.0").unlink()
    elif how == "short":
        with (array / "1.0").open("r+b") as file:
            file.truncate(10)
    else:
        meta = json.loads((array / ".zarray").read_text())
        (array / ".zarray").write_text(json.dumps({**meta, "compressor": {"id": "pickle"}}))


@pytest.mark.parametrize("how", ["missing", "short", "codec"])
def test_inspect_lists_what_convert_refuses(how: str, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(ZARR, tmp_path / "ckpt"))
    _break(ckpt / "iter_0000020" / OUTPUT, how)
    report = inspect_checkpoint(ckpt)
    (error,) = report["errors"]
    assert OUTPUT in error
    with pytest.raises(CheckpointError) as refused:
        convert(ckpt, tmp_path / "out", progress=False)
    assert str(refused.value) == error


def test_every_broken_array_is_listed(tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(ZARR, tmp_path / "ckpt"))
    _break(ckpt / "iter_0000020" / OUTPUT, "codec")
    (ckpt / "iter_0000020" / NORM / "0").unlink()  # a 1-D array: one chunk file, "0"
    errors = inspect_checkpoint(ckpt)["errors"]
    assert len(errors) == 2 and any(OUTPUT in e for e in errors) and any(NORM in e for e in errors)


def test_an_intact_checkpoint_has_no_errors() -> None:
    assert inspect_checkpoint(ZARR)["errors"] == []


def test_the_cli_exits_1_when_the_report_lists_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`inspect` prints the whole report and exits 1 when it holds `error` lines, 0 when not."""
    ckpt = Path(shutil.copytree(ZARR, tmp_path / "ckpt"))
    assert run(["inspect", str(ckpt)]) == 0
    _break(ckpt / "iter_0000020" / OUTPUT, "missing")
    assert run(["inspect", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("error ") and OUTPUT in line for line in out.splitlines())
