"""The safetensors reader of `diff` / `verify`: our own checks first, then the `safetensors` library's, which
refuses what the format forbids and ours allow (a gap between tensors, bytes after the last one)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from offline_bridge.errors import CheckpointError
from offline_bridge.readers.safetensors_file import SafetensorsFile


def _file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_reads_what_the_library_writes(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.array([7, -1], dtype=np.int64)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "np"})
    with SafetensorsFile(tmp_path / "x.safetensors") as st:
        assert st.metadata == {"format": "np"} and set(st.tensors) == {"a", "b"}
        for name, array in arrays.items():
            assert np.array_equal(st.array(name), array) and st.array(name).dtype == array.dtype


@pytest.mark.parametrize(
    ("offsets", "data", "needle"),
    [
        ([0, 8], bytes(12), "not fully covered"),  # 4 bytes after the last tensor
        ([4, 12], bytes(12), "invalid offset"),  # 4 bytes before the first
    ],
    ids=["trailing-bytes", "gap"],
)
def test_library_refuses_what_our_checks_allow(offsets: list[int], data: bytes, needle: str, tmp_path: Path) -> None:
    path = _file(tmp_path / "odd.safetensors", {"t": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}, data)
    with pytest.raises(CheckpointError) as refused:
        SafetensorsFile(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: the safetensors library refuses the file") and needle in message
    assert "\n" not in message


def test_our_check_comes_first(tmp_path: Path) -> None:
    """A key twice, which the library would take (the last one wins), is refused by our own check."""
    text = b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(CheckpointError, match="appears twice"):
        SafetensorsFile(path)
