"""The source fingerprint of a manifest: what a conversion read, hashed where it says what the checkpoint is.

A checkpoint directory may hold anything (notes, a 300 GB sparse file, a FIFO): every regular file is recorded
by size, and only a fixed list of files at fixed places is hashed, each under the size limit it is read with,
through `small_files` (regular files only). See formats/manifest.md, "Source fingerprints".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.digest import sha256_file
from ..files.small_files import JSON_LIMIT, METADATA_LIMIT, TEXT_LIMIT
from ..readers.base import CheckpointReader
from ..readers.combined import CombinedReader
from .jsonable import jsonable

__all__ = ["ConfigFrom", "args_digest", "describe_sources", "fingerprint"]

ConfigFrom = tuple[str, Path]  # where the model configuration was read: its kind ("common.pt args", ...), its file

# Files whose bytes say what the checkpoint is, hashed where the readers read them (at the top of the
# iteration directory; `.zarray` one level down), under the limit they are read with. Every other file, at
# any depth, is recorded by size only: a fingerprint never re-reads tensor data (`.distcp`, zarr chunks,
# legacy `model_optim_rng.pt`, whose args are in `args_sha256`) nor files no reader opens.
_HASHED_AT_TOP = {".metadata": METADATA_LIMIT, "common.pt": METADATA_LIMIT, "metadata.json": TEXT_LIMIT}
_HASHED_AT_TOP |= {"run_config.yaml": JSON_LIMIT, "integrity.json": JSON_LIMIT}
_ZARRAY = ".zarray"


def _hash_limit(relative: Path) -> int | None:
    """The size limit of a checkpoint file whose bytes the fingerprint hashes; None: recorded by size only."""
    if len(relative.parts) == 1:
        return _HASHED_AT_TOP.get(relative.name)
    return TEXT_LIMIT if len(relative.parts) == 2 and relative.name == _ZARRAY else None


def args_digest(args: argparse.Namespace | None) -> str | None:
    """sha256 of the Megatron args as canonical JSON (None when the checkpoint saved none)."""
    if args is None:
        return None
    try:
        text = json.dumps(jsonable(vars(args)), sort_keys=True, separators=(",", ":"), default=repr)
    except RecursionError:
        raise CheckpointError("the checkpoint's args nest too deeply (a self-referencing pickle?)") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _iteration(directory: Path) -> str:
    match = re.fullmatch(r"iter_([0-9]+)", directory.name)
    return str(int(match.group(1))) if match else directory.name


def _config_entry(config_from: ConfigFrom | None, directory: Path) -> dict[str, str] | None:
    """``{"kind", "file"}`` when the configuration was read under ``directory`` (or beside it: Bridge's
    run_config.yaml): the file relative to it, so that the manifest holds no absolute path."""
    if config_from is None:
        return None
    kind, file = config_from
    if directory in file.parents:
        return {"kind": kind, "file": file.relative_to(directory).as_posix()}
    if file.parent == directory.parent:
        return {"kind": kind, "file": f"../{file.name}"}
    return None


def fingerprint(reader: CheckpointReader, role: str, config_from: ConfigFrom | None = None) -> dict[str, Any]:
    """Format, iteration, the checkpoint's files (metadata hashed, data by size) and its args' hash; and
    `config` when the model configuration was read from this checkpoint (``config_from``)."""
    files = {}
    for path in sorted(p for p in reader.path.rglob("*") if p.is_file()):
        relative = path.relative_to(reader.path)
        entry: dict[str, Any] = {"size": path.stat().st_size}
        limit = _hash_limit(relative)
        if limit is not None:
            entry["sha256"] = sha256_file(path, limit, "checkpoint file")
        files[relative.as_posix()] = entry
    found = {
        "role": role,
        "format": reader.format,
        "iteration": _iteration(reader.path),
        "args_sha256": args_digest(reader.args),
        "files": files,
    }
    config = _config_entry(config_from, reader.path)
    return found if config is None else {**found, "config": config}


def describe_sources(
    reader: CheckpointReader, hf_config: str | Path | None = None, config_from: ConfigFrom | None = None
) -> list[dict[str, Any]]:
    """Fingerprints of everything a conversion read: the checkpoint (or base and adapter) and --hf-config,
    the one the model configuration came from marked with `config` (``--hf-config`` when given)."""
    if isinstance(reader, CombinedReader):
        sources = [fingerprint(reader.base, "base", config_from), fingerprint(reader.adapter, "adapter", config_from)]
    else:
        sources = [fingerprint(reader, "checkpoint", config_from)]
    if hf_config is not None:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        sources.append(
            {
                "role": "hf_config",
                "format": "json",
                "files": {path.name: {"sha256": sha256_file(path, JSON_LIMIT, "HF config")}},
                "config": {"kind": "--hf-config", "file": path.name},
            }
        )
    return sources
