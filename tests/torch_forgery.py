"""Forging torch checkpoints as an attacker would: by structure, not by flipping bytes.

A forged checkpoint is a copy of examples/tiny-llama with one file rebuilt: a pickle put in `common.pt` or
`.metadata`, a record replaced in a `.distcp` file (appended to it, the metadata pointing there). Tests run
the CLI on them through `hostile.run_cli` (a process of its own, under a memory cap and a time limit).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-llama"
ITERATION = "iter_0000010"


def copy_example(tmp_path: Path) -> Path:
    """A private copy of examples/tiny-llama; returns its iteration directory."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt")) / ITERATION


class Payload:
    """What an attacker pickles: running it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class Reduce:
    """Pickles as ``func(*args)`` followed by BUILD ``state`` (if given): any structure numpy or torch could
    be asked to build."""

    def __init__(self, func: Callable, args: tuple, state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def rezip(members: list[tuple[str, bytes]]) -> bytes:
    """A zip of ``members`` (stored, in order, duplicates kept) as torch.save lays them out."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
    return out.getvalue()


def members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def with_pickle(archive: bytes, data_pkl: bytes) -> bytes:
    """The torch.save ``archive`` with its data.pkl replaced."""
    return rezip([(name, data_pkl if name.endswith("/data.pkl") else data) for name, data in members(archive)])


def record_of(tensor: torch.Tensor) -> bytes:
    """What DCP writes for a chunk: `torch.save(tensor)` to a stream."""
    out = io.BytesIO()
    torch.save(tensor, out)
    return out.getvalue()


def tensor_pickle(storage: type, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """data.pkl of a torch.save archive: `_rebuild_tensor_v2` of storage `data/0` with any layout."""
    key = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            return ("storage", storage, "0", "cpu", numel) if obj is key else None

    out = io.BytesIO()
    args = (key, offset, size, stride, False, collections.OrderedDict())
    Pickler(out, protocol=2).dump(Reduce(torch._utils._rebuild_tensor_v2, args))
    return out.getvalue()


def load_metadata(iteration: Path):  # our own fixture: trusted here
    return pickle.loads((iteration / ".metadata").read_bytes())


def save_metadata(iteration: Path, metadata: object) -> None:
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def replace_record(iteration: Path, key: str, chunk: int, record: bytes) -> str:
    """Point chunk number ``chunk`` of ``key`` at ``record``, appended to its `.distcp` file; returns the file."""
    metadata = load_metadata(iteration)
    offsets = metadata.state_dict_metadata[key].chunks[chunk].offsets
    index = next(i for i in metadata.storage_data if i.fqn == key and tuple(i.offset) == tuple(offsets))
    info = metadata.storage_data[index]
    file = iteration / info.relative_path
    start = file.stat().st_size
    with open(file, "ab") as handle:
        handle.write(record)
    info.offset, info.length = start, len(record)
    save_metadata(iteration, metadata)
    return info.relative_path


def read_record(iteration: Path, key: str, chunk: int) -> bytes:
    """The bytes of chunk number ``chunk`` of ``key``'s record."""
    metadata = load_metadata(iteration)
    offsets = metadata.state_dict_metadata[key].chunks[chunk].offsets
    info = next(v for i, v in metadata.storage_data.items() if i.fqn == key and tuple(i.offset) == tuple(offsets))
    with open(iteration / info.relative_path, "rb") as handle:
        handle.seek(info.offset)
        return handle.read(info.length)
