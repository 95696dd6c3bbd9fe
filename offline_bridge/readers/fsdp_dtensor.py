"""Megatron-FSDP's `--ckpt-format fsdp_dtensor`: plain PyTorch DCP of DTensors, told apart from `torch_dcp`
by `use_megatron_fsdp` (or `ckpt_format`) in the saved args. The bytes are read as torch_dist's are (the
same `.metadata` catalog, allow-list unpickler and chunk records; DTensor chunks may be uneven, and the
coverage check still refuses gaps, overlaps and chunks out of bounds); only the keys differ
(`fsdp_keys`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from .base import TensorInfo
from .dcp_metadata import Catalog, read_catalog
from .fsdp_keys import present_keys
from .torch_dist import TorchDistReader

__all__ = ["FsdpDtensorReader", "is_megatron_fsdp", "open_dcp"]


def is_megatron_fsdp(args: argparse.Namespace | None) -> bool:
    """Whether Megatron-LM's args say the run saved with Megatron-FSDP's `fsdp_dtensor` format."""
    return bool(getattr(args, "use_megatron_fsdp", False)) or getattr(args, "ckpt_format", None) == "fsdp_dtensor"


class FsdpDtensorReader(TorchDistReader):
    """Reader of an `fsdp_dtensor` iteration directory (`.metadata`, `__*_*.distcp`; no `common.pt`)."""

    def __init__(self, path: Path, *, check_crc: bool = False, catalog: Catalog | None = None) -> None:
        super().__init__(path, check_crc=check_crc, catalog=catalog)
        self.format = "fsdp_dtensor"

    def _stored_keys(self, tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
        return present_keys(tensors, str(self.path / ".metadata"))


def open_dcp(path: Path, *, check_crc: bool = False) -> TorchDistReader:
    """The reader of a DCP iteration directory: torch_dist with `common.pt`, else fsdp_dtensor when its
    args say so, else torch_dist / torch_dcp as the keys say."""
    metadata = Path(path) / ".metadata"
    catalog = read_catalog(metadata) if metadata.exists() else None
    reader = TorchDistReader(path, check_crc=check_crc, catalog=catalog)
    if (Path(path) / "common.pt").exists() or not is_megatron_fsdp(reader.args):
        return reader
    reader.close()
    return FsdpDtensorReader(path, check_crc=check_crc, catalog=catalog)  # `.metadata` read once
