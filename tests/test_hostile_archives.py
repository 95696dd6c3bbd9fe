"""Hostile torch.save archives, DCP metadata and rank files, forged by structure on a copy of
examples/tiny-llama: each is read exactly as torch reads it, or refused (exit 2, one line naming the file);
`inspect` reports what `convert` refuses; costs stay linear in the input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hostile import Outcome, assert_refused, run_cli
from torch.distributed.checkpoint.api import CheckpointException
from torch_forgery import (
    copy_example,
    load_metadata,
    members,
    read_record,
    record_of,
    replace_record,
    rezip,
    save_metadata,
    tensor_pickle,
)

from offline_bridge import convert
from offline_bridge.errors import CheckpointError
from offline_bridge.readers.pickles.torch_save import TorchArchive

EMBEDDING = "embedding.word_embeddings.weight"  # chunks (128, 64) in bf16


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/tiny-llama converted as it is."""
    iteration = copy_example(tmp_path_factory.mktemp("reference"))
    return convert(iteration, iteration.parent.parent / "hf", progress=False)


def chunk(iteration: Path) -> torch.Tensor:
    """The first chunk of the embedding, as torch reads its record."""
    return torch.load(io.BytesIO(read_record(iteration, EMBEDDING, 0)), weights_only=True)


def forged(data: bytes, **changes: bytes) -> bytes:
    """The torch.save archive ``data`` with members (by name ending) replaced."""
    return rezip(
        [(name, next((v for k, v in changes.items() if name.endswith(k)), value)) for name, value in members(data)]
    )


def refuses_convert(iteration: Path, *named: str) -> str:
    out = iteration.parent.parent / "out"
    line = assert_refused(run_cli("convert", iteration, out, "--quiet", cwd=iteration.parent.parent), *named)
    assert not out.exists()
    return line


def inspect_reports(iteration: Path, text: str) -> None:
    """`inspect` names the problem `convert` refuses: as an error line of its report, and exits 1."""
    result: Outcome = run_cli("inspect", iteration, cwd=iteration.parent.parent)
    assert result.code == 1 and any(text in line for line in result.stdout.splitlines() if line.startswith("error"))


# --- we read what torch reads ------------------------------------------------------------------------------


def test_a_member_named_twice_is_refused(tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    record = read_record(iteration, EMBEDDING, 0)
    data = next(value for name, value in members(record) if name.endswith("data/0"))
    twice = rezip([*members(record), ("archive/data/0", bytes(len(data)))])
    assert torch.equal(torch.load(io.BytesIO(twice), weights_only=True), chunk(iteration))  # torch: the first
    file = replace_record(iteration, EMBEDDING, 0, twice)
    assert "twice" in refuses_convert(iteration, file)


def test_a_record_followed_by_another_archive_is_refused(tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    original = chunk(iteration)
    appended = read_record(iteration, EMBEDDING, 0) + record_of(torch.zeros_like(original))
    assert torch.equal(torch.load(io.BytesIO(appended), weights_only=True), original)  # torch: the first
    file = replace_record(iteration, EMBEDDING, 0, appended)
    refuses_convert(iteration, file, "not a torch.save archive")


@pytest.mark.parametrize("where", ["after", "before"])
def test_common_pt_with_a_second_archive_is_refused(where: str, tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    file = iteration / "common.pt"
    other = io.BytesIO()
    torch.save({"args": argparse.Namespace(hidden_size=12345)}, other)
    original = file.read_bytes()
    file.write_bytes(original + other.getvalue() if where == "after" else other.getvalue() + original)
    if where == "after":  # torch reads the first archive or refuses; zipfile would find the second
        with contextlib.suppress(RuntimeError):
            assert torch.load(io.BytesIO(file.read_bytes()), weights_only=False)["args"].hidden_size == 64
    assert_refused(run_cli("inspect", iteration, cwd=iteration.parent.parent), "common.pt", "not a torch.save archive")


def test_a_big_endian_record_is_refused(tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    original = chunk(iteration)
    swapped = original.view(torch.int16).numpy().astype(">i2").tobytes()
    big = forged(read_record(iteration, EMBEDDING, 0), byteorder=b"big", **{"data/0": swapped})
    assert torch.equal(torch.load(io.BytesIO(big), weights_only=True), original)  # torch swaps the bytes back
    file = replace_record(iteration, EMBEDDING, 0, big)
    assert "byteorder" in refuses_convert(iteration, file)


def test_a_transposed_chunk_is_refused_as_dcp_does(tmp_path: Path) -> None:
    """A (64, 128) record for a (128, 64) chunk: same element count, other sizes."""
    iteration = copy_example(tmp_path)
    file = replace_record(iteration, EMBEDDING, 0, record_of(chunk(iteration).reshape(64, 128)))
    with pytest.raises(CheckpointException) as refused:  # DCP's own reader
        dcp.load({EMBEDDING: torch.empty(256, 64, dtype=torch.bfloat16)}, checkpoint_id=iteration, no_dist=True)
    assert "mismatch sizes" in str(refused.value.failures)
    assert "does not match metadata (128, 64)" in refuses_convert(iteration, file)
    inspect_reports(iteration, "does not match metadata")


def test_a_strided_record_reads_as_torch_reads_it(tmp_path: Path, reference: Path) -> None:
    """A record whose tensor is a transposed view of its storage: torch reads the chunk; so do we."""
    iteration = copy_example(tmp_path)
    original = chunk(iteration)
    strided = original.t().contiguous().t()
    assert strided.stride() == (1, 128) and torch.equal(strided, original)
    replace_record(iteration, EMBEDDING, 0, record_of(strided))
    out = convert(iteration, tmp_path / "hf", progress=False)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _record(data: torch.Tensor, size: tuple, stride: tuple) -> bytes:
    """A record of ``data``'s bytes as a tensor of ``size`` and ``stride``, whatever torch would build."""
    pickled = tensor_pickle(torch.BFloat16Storage, data.numel(), 0, size, stride)
    return forged(record_of(data), **{"data.pkl": pickled})


@pytest.mark.parametrize(
    ("size", "stride", "why"),
    [
        ((128, 64), (0, 1), "does not fit its storage"),  # rows read over and over (a broadcast)
        ((128, 64), (65, 1), "does not fit its storage"),  # past the end of the storage
        ((128, 64), (64, -1), "strides"),
        ((1,) * 68 + (128, 64), (64,) * 68 + (64, 1), "70 dimensions"),
    ],
    ids=["broadcast", "past-the-end", "negative", "70-dims"],
)
def test_records_that_do_not_fit_their_storage(size: tuple, stride: tuple, why: str, tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    file = replace_record(iteration, EMBEDDING, 0, _record(chunk(iteration), size, stride))
    assert why in refuses_convert(iteration, file)
    inspect_reports(iteration, file)


def test_a_record_of_another_dtype_is_refused(tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    file = replace_record(iteration, EMBEDDING, 0, record_of(chunk(iteration).view(torch.int16)))
    assert "differs from metadata" in refuses_convert(iteration, file)
    inspect_reports(iteration, "differs from metadata")


# --- metadata ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sizes", "why"),
    [
        ((2**40, 64), (2**40, 64), "cannot hold"),
        ((256, -64), (128, -64), "negative"),
        ((1,) * 68 + (256, 64), (1,) * 68 + (128, 64), "70 dimensions"),
    ],
    ids=["huge", "negative", "70-dims"],
)
def test_metadata_shapes(size: tuple, sizes: tuple, why: str, tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    metadata = load_metadata(iteration)
    entry = metadata.state_dict_metadata[EMBEDDING]
    entry.size = torch.Size(size)
    if why == "cannot hold":  # one chunk, the first, for the whole tensor
        entry.chunks = [c for c in entry.chunks if not any(c.offsets)]
    for c in entry.chunks:
        c.sizes = torch.Size(sizes)
        c.offsets = torch.Size((0,) * (len(size) - 2) + tuple(c.offsets))
    index = {i: v for i, v in metadata.storage_data.items() if i.fqn == EMBEDDING}
    for i, info in index.items():
        del metadata.storage_data[i]
        metadata.storage_data[replace(i, offset=torch.Size((0,) * (len(size) - 2) + tuple(i.offset)))] = info
    save_metadata(iteration, metadata)
    if why == "cannot hold":  # convert may refuse it first for disagreeing with the args
        refuses_convert(iteration, EMBEDDING)
        inspect_reports(iteration, "cannot hold")
    else:
        assert why in refuses_convert(iteration, ".metadata")
        assert_refused(run_cli("inspect", iteration, cwd=iteration.parent.parent), ".metadata", why)


# --- special files, integrity ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["__0_0.distcp", "common.pt", ".metadata"])
def test_a_fifo_is_refused_not_waited_on(name: str, tmp_path: Path) -> None:
    iteration = copy_example(tmp_path)
    (iteration / name).unlink()
    os.mkfifo(iteration / name)
    assert "not a regular file" in refuses_convert(iteration, name)


def test_a_flipped_byte_is_caught_by_the_crc(tmp_path: Path, reference: Path) -> None:
    """Undetected by default (the bytes are copied as they are); `check_crc` compares them with the zip CRC-32."""
    iteration = copy_example(tmp_path)
    record = bytearray(read_record(iteration, EMBEDDING, 0))
    archive = TorchArchive(memoryview(bytes(record)), 0, len(record), "record")
    record[archive.storage_start(archive.load())] ^= 0x40
    file = replace_record(iteration, EMBEDDING, 0, bytes(record))
    out = convert(iteration, tmp_path / "hf", progress=False)
    assert (out / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=rf"{file} .*CRC-32"):
        convert(iteration, tmp_path / "hf-crc", progress=False, check_crc=True)
    assert not (tmp_path / "hf-crc").exists()
    assert_refused(
        run_cli("convert", iteration, tmp_path / "hf-cli", "--check-crc", "--quiet", cwd=tmp_path),
        Path(file).name,
        "CRC-32",
    )
    assert not (tmp_path / "hf-cli").exists()


def test_legacy_records_are_checked_against_their_crc(tmp_path: Path) -> None:
    from offline_bridge.readers import LegacyReader

    rank = tmp_path / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save(
        {"args": argparse.Namespace(), "model": {"output_layer.weight": weight}},
        rank / "model_optim_rng.pt",
    )
    data = bytearray((rank / "model_optim_rng.pt").read_bytes())
    archive = TorchArchive(memoryview(bytes(data)), 0, len(data), "rank file")
    data[archive.storage_start(archive.load()["model"]["output_layer.weight"])] ^= 1
    (rank / "model_optim_rng.pt").write_bytes(data)
    with LegacyReader(rank.parent) as reader:
        assert not np.array_equal(reader.read("output_layer.weight"), weight.numpy())  # copied as it is
    with LegacyReader(rank.parent, check_crc=True) as reader, pytest.raises(CheckpointError, match="CRC-32"):
        reader.read("output_layer.weight")
