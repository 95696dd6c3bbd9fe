"""Checkpoint readers, one per on-disk format, chosen from what the iteration directory holds."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .base import CheckpointReader, TensorInfo
from .legacy import FILE as LEGACY_FILE
from .legacy import LegacyReader
from .torch_dist import TorchDistReader
from .zarr import ZarrReader

__all__ = ["CheckpointReader", "LegacyReader", "TensorInfo", "TorchDistReader", "ZarrReader", "open_reader"]


def open_reader(iteration_dir: Path, *, check_crc: bool = False) -> CheckpointReader:
    """The reader for ``iteration_dir``, by `metadata.json`'s backend or the files present; ``check_crc``:
    compare each torch.save record's bytes with their CRC-32 as they are first used."""
    backend = None
    marker = iteration_dir / "metadata.json"
    if marker.is_file():
        try:
            backend = json.loads(marker.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{marker}: unreadable ({exc})") from exc
    if backend in (None, "torch_dist") and (iteration_dir / ".metadata").exists():  # a FIFO too: refused there
        return TorchDistReader(iteration_dir, check_crc=check_crc)
    if backend == "zarr":
        return ZarrReader(iteration_dir)
    if backend is None and any(iteration_dir.glob(f"mp_rank_*/{LEGACY_FILE}")):
        return LegacyReader(iteration_dir, check_crc=check_crc)
    found = backend or ", ".join(sorted(p.name for p in iteration_dir.iterdir())[:8]) or "an empty directory"
    raise CheckpointError(
        f"{iteration_dir}: unsupported checkpoint format ({found}); offline-bridge reads torch_dist, zarr, legacy torch and torch_dcp"
    )
