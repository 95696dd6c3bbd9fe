"""The small vectors of formats/vectors/ (see its README), read by our reader and by torch's own DCP."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from offline_bridge.errors import UnsafePickleError
from offline_bridge.readers import TorchDistReader
from offline_bridge.readers.pickles.safe_pickle import safe_loads
from offline_bridge.readers.pickles.torch_save import TorchArchive, load_torch_file

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
TINY = VECTORS / "tiny_ckpt" / "iter_0000007"


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("chunk_bf16.pt", [[[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]]]),
        ("chunk_fp32.pt", [[1.0, -2.0, 0.25], [3.5, 0.0, -0.125]]),
    ],
)
def test_chunk_records(name: str, values: list) -> None:
    data = (VECTORS / name).read_bytes()
    archive = TorchArchive(memoryview(data), 0, len(data), name)
    array = archive.array(archive.load())
    tensor = torch.from_numpy(array.copy())
    if name == "chunk_bf16.pt":
        tensor = tensor.view(torch.bfloat16)
    assert tensor.float().tolist() == values


@pytest.mark.parametrize(
    ("name", "culprit"),
    [
        ("malicious_metadata.pkl", "system"),
        ("malicious_stack_global.pkl", "builtins.eval"),
        ("malicious_nested_metadata.pkl", "subprocess.check_output"),
    ],
)
def test_malicious_pickles_are_refused(name: str, culprit: str) -> None:
    with pytest.raises(UnsafePickleError, match=culprit):
        safe_loads((VECTORS / name).read_bytes(), name)


def test_malicious_chunk_is_refused() -> None:
    with pytest.raises(UnsafePickleError, match="system"):
        load_torch_file(str(VECTORS / "malicious_chunk.pt"))


@pytest.mark.parametrize("name", ["mcore015_metadata.pkl", "metadata_posixpath.pkl"])
def test_metadata_variants_parse(name: str) -> None:
    metadata = safe_loads((VECTORS / name).read_bytes(), name)
    assert "embedding.word_embeddings.weight" in metadata.state_dict_metadata


def test_python313_posixpath() -> None:
    assert safe_loads((VECTORS / "posixpath_py313.pkl").read_bytes(), "p") == pathlib.PosixPath("/ckpt/iter_0000007")


def test_tiny_checkpoint_matches_torch_dcp() -> None:
    """Every model tensor we assemble equals what torch.distributed.checkpoint loads itself."""
    with TorchDistReader(TINY) as reader:
        assert reader.args.hidden_size == 4
        keys = [k for k in reader.tensors if not k.startswith("optimizer.")]
        expected = {
            k: torch.empty(reader.tensors[k].shape, dtype=getattr(torch, reader.tensors[k].dtype.torch_name))
            for k in keys
        }
        dcp.load(expected, checkpoint_id=TINY, no_dist=True)
        for key in keys:
            ours = torch.from_numpy(reader.read(key).copy()).view(expected[key].dtype)
            assert torch.equal(ours, expected[key]), key
        fc1 = reader.read("decoder.layers.mlp.linear_fc1.weight", ((1, 2), (0, 12), (0, 4)))
        assert np.array_equal(
            torch.from_numpy(fc1.copy()).view(torch.bfloat16).float().numpy().ravel(), np.arange(48, 96)
        )
