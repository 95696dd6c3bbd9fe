"""Output files known to be complete, so that a killed run started again with `--resume` writes only the rest,
and `finalize` can check the parts other processes wrote.

Once a file is flushed to disk (fsync), a record of it (size, header sha256, every tensor's sha256) goes into
the staging area's `.meta/done/`; the file is on disk before its record is, so a record never vouches for
bytes a crash lost, and a torn record only costs rewriting its file. A record is a claim, not trusted: a file
counts as complete only when its header and every tensor still hash to the record (and, for `--resume`, the
record matches the plan). Everything under `.meta/` is bookkeeping, removed before the output is in place.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.small_files import JSON_LIMIT, load_json
from ..plan.schema import FilePlan, Plan
from ..readers.safetensors_file import SafetensorsFile
from .json_file import write_json

__all__ = ["META", "completed_files", "keep_only", "record_done", "record_path", "recorded_digests", "recorded_files"]

META = ".meta"  # bookkeeping inside a staging area; never part of an output
_DONE = "done"
_THREADS = 4

log = logging.getLogger(__name__)


def record_path(directory: Path, name: str) -> Path:
    return directory / META / _DONE / f"{name}.json"


def record_done(directory: Path, file: FilePlan, digests: dict[str, str]) -> None:
    """Record ``file`` (flushed to disk already) as complete, with its tensors' sha256 by name."""
    record = record_path(directory, file.name)
    record.parent.mkdir(parents=True, exist_ok=True)
    header = hashlib.sha256(file.header).hexdigest()
    write_json(record, {"file": file.name, "size": file.size, "header_sha256": header, "tensors": digests})


def recorded_digests(directory: Path, name: str) -> dict[str, str] | None:
    """The tensors' sha256 of ``name`` when its record exists and the file still matches it (header, size and
    every tensor's bytes), else None."""
    record = _load(directory, name)
    if record is None:
        return None
    try:
        with SafetensorsFile(directory / name) as st:
            if st.path.stat().st_size != record["size"]:
                return None
            if hashlib.sha256(st.header()).hexdigest() != record["header_sha256"]:
                return None
            if set(st.tensors) != set(record["tensors"]):
                return None
            if any(st.sha256(tensor) != digest for tensor, digest in record["tensors"].items()):
                return None
    except (OSError, CheckpointError):
        return None
    return record["tensors"]


def completed_files(directory: Path, plan: Plan, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """The files among ``names`` that are complete in ``directory`` for this plan (same size and header as
    planned, bytes as recorded), with their tensors' sha256."""
    files = {file.name: file for file in plan.files}
    wanted = [name for name in names if record_path(directory, name).exists()]
    found = _on_threads(lambda name: _as_planned(directory, files[name]), wanted)
    kept = {name: digests for name, digests in found.items() if digests is not None}
    if wanted:
        log.info("resuming: %d of %d files already complete", len(kept), len(files))
    return kept


def recorded_files(directory: Path, names: list[str]) -> dict[str, dict[str, str] | None]:
    """`recorded_digests` of every file in ``names``, hashed on several threads."""
    return _on_threads(lambda name: recorded_digests(directory, name), names)


def _on_threads(check: Callable[[str], dict[str, str] | None], names: list[str]) -> dict[str, dict[str, str] | None]:
    with ThreadPoolExecutor(_THREADS) as pool:  # hashlib releases the GIL: files hash in parallel
        return dict(zip(names, pool.map(check, names)))


def _as_planned(directory: Path, file: FilePlan) -> dict[str, str] | None:
    record = _load(directory, file.name)
    if record is None or record["size"] != file.size:
        return None
    if record["header_sha256"] != hashlib.sha256(file.header).hexdigest():
        return None
    return recorded_digests(directory, file.name)


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    """A record of the right shape, or None (absent, torn, or not ours)."""
    try:
        record = load_json(record_path(directory, name), JSON_LIMIT, "completion record")
    except CheckpointError:
        return None
    shaped = (
        isinstance(record, dict)
        and record.get("file") == name
        and isinstance(record.get("size"), int)
        and isinstance(record.get("header_sha256"), str)
        and isinstance(record.get("tensors"), dict)
        and all(isinstance(v, str) for v in record["tensors"].values())
    )
    return record if shaped else None


def keep_only(directory: Path, kept: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Remove everything in a taken-over staging ``directory`` but the ``kept`` files and the bookkeeping (a
    killed run of other options leaves files this plan does not write); ``kept`` back."""
    for path in directory.iterdir():
        if path.name not in kept and path.name != META:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return kept
