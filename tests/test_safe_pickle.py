"""The allow-list unpickler: reads what torch and Megatron write, refuses (never runs) anything else."""

from __future__ import annotations

import argparse
import builtins
import os
import pathlib
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from offline_bridge.errors import CheckpointError, UnsafePickleError
from offline_bridge.readers.pickles.safe_pickle import safe_loads
from offline_bridge.readers.pickles.torch_save import load_torch_file


class _Call:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (_Call(os.system, "true"), "system"),
        (_Call(builtins.eval, "1"), "builtins.eval"),
        (_Call(subprocess.Popen, ["true"]), "subprocess.Popen"),
        (_Call(getattr, "text", "upper"), "builtins.getattr"),
        (_Call(torch.load, "x"), "torch.serialization.load"),
    ],
)
def test_refuses_callables(payload: object, named: str) -> None:
    with pytest.raises(UnsafePickleError, match=rf"f\.pkl: refusing to unpickle .*{named}"):
        safe_loads(pickle.dumps(payload), "f.pkl")


def test_garbled_pickle_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="cannot unpickle"):
        safe_loads(pickle.dumps({"a": 1})[:-3], "f.pkl")


def test_reads_dcp_metadata_written_by_torch(tmp_path: Path) -> None:
    dcp.save({"w": torch.ones(3, 2, dtype=torch.bfloat16)}, checkpoint_id=tmp_path, no_dist=True)
    metadata = safe_loads((tmp_path / ".metadata").read_bytes(), ".metadata")
    entry = metadata.state_dict_metadata["w"]
    assert tuple(entry.size) == (3, 2)
    assert entry.properties.dtype.safetensors == "BF16"
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks] == [((0, 0), (3, 2))]


def test_reads_megatron_style_common_state(tmp_path: Path) -> None:
    args = argparse.Namespace(hidden_size=64, params_dtype=torch.bfloat16, save=pathlib.PosixPath("/x"))
    torch.save({"args": args, "iteration": 7, "tensor": torch.arange(4)}, tmp_path / "common.pt")
    state = load_torch_file(str(tmp_path / "common.pt"))
    assert state["iteration"] == 7
    assert state["args"].hidden_size == 64 and state["args"].save == pathlib.PosixPath("/x")
    assert state["args"].params_dtype.torch_name == "bfloat16"
    assert state["tensor"].shape == (4,)  # a reference only: no bytes were read
