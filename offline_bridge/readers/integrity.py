"""megatron-core 0.18's `integrity.json` (`save(..., verify_integrity=True)`): the sha256 of every file of a
torch_dist save, checked here before a conversion writes its first byte.

The file is `{"algorithm": "sha256", "files": {"<name in the iteration directory>": "<hex digest>"}}`
(`megatron/core/dist_checkpointing/validation.py`, `save_integrity_manifest`). It is untrusted like the rest of
the checkpoint: only plain names in the directory are hashed, each a regular file, and a listed file that is
missing or differs is an error naming it, as Megatron's own `verify_integrity_manifest` treats it. Files it
does not list (Megatron-Bridge writes `run_config.yaml` and `train_state.pt` after the save) are not checked.
Hashing is `files.digest` on threads (hashlib releases the GIL).
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError
from ..files.digest import sha256_file
from ..files.small_files import JSON_LIMIT, load_json, quote

__all__ = ["INTEGRITY_FILE", "check_integrity"]

INTEGRITY_FILE = "integrity.json"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_THREADS = 4

log = logging.getLogger(__name__)


def _listed(directory: Path) -> dict[str, str]:
    """The file names and digests `integrity.json` lists, each checked to be a plain name and a sha256."""
    path = directory / INTEGRITY_FILE
    found = load_json(path, JSON_LIMIT, "integrity manifest")
    if not isinstance(found, dict) or not isinstance(found.get("files"), dict):
        raise CheckpointError(f"{path}: field 'files' must be an object of file name -> sha256")
    algorithm = found.get("algorithm", "sha256")
    if algorithm != "sha256":
        raise CheckpointError(f"{path}: field 'algorithm' is {quote(algorithm)}; megatron-core writes only sha256")
    for name, digest in found["files"].items():
        if name in ("", ".", "..", INTEGRITY_FILE) or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"{path}: field 'files' lists {quote(name)}, not a file of the checkpoint directory")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise CheckpointError(f"{path}: field 'files[{quote(name)}]' is {quote(digest)}, not a sha256 hex digest")
    return found["files"]


def _mismatch(directory: Path, name: str, expected: str) -> str | None:
    file = directory / name
    if not os.path.lexists(file):
        return f"{file}: listed in {INTEGRITY_FILE} but missing"
    actual = sha256_file(file, None, "checkpoint file")
    if actual != expected:
        return f"{file}: sha256 {actual[:16]}… differs from {INTEGRITY_FILE}'s {expected[:16]}… (damaged or changed)"
    return None


def check_integrity(directory: Path, workers: int | None = None) -> int:
    """Check the files `integrity.json` lists in ``directory`` against their sha256; the number checked (0 when
    there is no `integrity.json`). The first file that is missing or differs is a `CheckpointError`."""
    if not os.path.lexists(directory / INTEGRITY_FILE):
        return 0
    listed = _listed(directory)
    log.info("checking %d files against %s", len(listed), directory / INTEGRITY_FILE)
    threads = max(1, min(workers or os.cpu_count() or 1, _MAX_THREADS, len(listed) or 1))
    pool = ThreadPoolExecutor(threads)
    try:
        for problem in pool.map(lambda item: _mismatch(directory, *item), sorted(listed.items())):
            if problem is not None:
                raise CheckpointError(problem)
    finally:
        pool.shutdown(cancel_futures=True)  # the first problem stops the hashing of files not yet started
    return len(listed)
