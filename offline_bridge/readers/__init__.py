"""Checkpoint readers, one per on-disk format, chosen from what the iteration directory holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError
from ..files.small_files import clip, quote
from .base import CheckpointReader, TensorInfo
from .fsdp_dtensor import FsdpDtensorReader, open_dcp
from .legacy import FILE as LEGACY_FILE
from .legacy import LegacyReader
from .marker import read_marker
from .torch_dist import TorchDistReader
from .zarr import ZarrReader

__all__ = [
    "CheckpointReader",
    "FsdpDtensorReader",
    "LegacyReader",
    "TensorInfo",
    "TorchDistReader",
    "ZarrReader",
    "open_reader",
]


def _refuse_special_files(iteration_dir: Path) -> None:
    """A FIFO, socket or device where a reader maps or reads a file would block forever or never end: refused
    before any reader runs. Readers that open through `small_files` refuse them again at open time, race-free."""
    opened = [p for p in iteration_dir.iterdir() if p.name in (".metadata", "common.pt") or p.suffix == ".distcp"]
    for path in [*opened, *iteration_dir.glob(f"mp_rank_*/{LEGACY_FILE}")]:
        try:
            mode = os.stat(path).st_mode
        except OSError:  # dangling: the reader names it as missing
            continue
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); the checkpoint is refused")


def open_reader(
    iteration_dir: Path, *, check_crc: bool = False, inspecting: bool = False, strict: bool = False
) -> CheckpointReader:
    """The reader for ``iteration_dir``, by `metadata.json`'s backend or the files present; ``check_crc``:
    compare each torch.save record's bytes with their CRC-32 as they are first used; ``inspecting``: what a
    reader would refuse when opened is left to its `validate` where it can be (zarr arrays); ``strict``: refuse
    legacy replicas that differ between TP ranks (else TP rank 0's copy is taken, with a warning)."""
    _refuse_special_files(iteration_dir)
    backend = (read_marker(iteration_dir) or {}).get("sharded_backend")
    if backend in (None, "torch_dist") and (iteration_dir / ".metadata").is_file():
        return open_dcp(iteration_dir, check_crc=check_crc)
    if backend == "zarr":
        return ZarrReader(iteration_dir, defer_problems=inspecting)
    if backend is None and any(iteration_dir.glob(f"mp_rank_*/{LEGACY_FILE}")):
        return LegacyReader(iteration_dir, check_crc=check_crc, strict=strict)
    listing = clip(", ".join(sorted(p.name for p in iteration_dir.iterdir())[:8])) or "an empty directory"
    found = quote(backend) if backend is not None else listing
    raise CheckpointError(
        f"{iteration_dir}: unsupported checkpoint format ({found}); offline-bridge reads torch_dist, zarr, legacy torch, torch_dcp and fsdp_dtensor"
    )
