"""`export-adapter` refuses a bad OUT_DIR or option before it reads the adapter save (issue 22), like `convert`.

The adapter path given does not exist: an error about it would mean the checkpoint was looked at first."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_bridge.commands.export_adapter import export_adapter
from offline_bridge.errors import BridgeError, OptionError


def _out(tmp_path: Path, kind: str) -> Path:
    out = tmp_path / "out"
    if kind == "non-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("a file")
    return out


@pytest.mark.parametrize("kind", ["non-empty", "file"])
def test_out_dir_is_checked_before_the_adapter_is_read(kind: str, tmp_path: Path) -> None:
    out = _out(tmp_path, kind)
    with pytest.raises(BridgeError) as refused:
        export_adapter(tmp_path / "missing", out, progress=False)
    assert str(out) in str(refused.value) and "missing" not in str(refused.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("dtype", "fp8"), ("expert_format", "fused"), ("model_type", "gpt9"), ("lora_dim", 0), ("iteration", "²")],
)
def test_bad_option_is_refused_before_the_adapter_is_read(option: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(OptionError) as refused:
        export_adapter(tmp_path / "missing", tmp_path / "out", progress=False, **{option: value})
    assert "missing" not in str(refused.value)
