"""`offline-bridge.json`: what an output directory was made from and with, and the hash of every byte in it.

Written last into the staging directory by `convert` and `export-adapter`; `verify` recomputes it. It
holds no timestamps and no absolute paths, so the same input and options give the same manifest on any
machine. See formats/manifest.md.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.digest import sha256_file
from ..files.small_files import JSON_LIMIT, clip, load_json, quote
from ..readers.safetensors_file import SafetensorsFile
from .completed import META
from .json_file import write_json
from .jsonable import jsonable

__all__ = [
    "MANIFEST",
    "load_manifest",
    "verify",
    "write_manifest",
]

MANIFEST = "offline-bridge.json"
MANIFEST_VERSION = 1


def _tool_version() -> str:
    from .. import __version__

    return __version__


def write_manifest(
    out_dir: Path,
    command: str,
    options: Mapping[str, Any],
    sources: list[dict[str, Any]],
    digests: Mapping[str, Mapping[str, str]],
) -> None:
    """Write `offline-bridge.json` for the files now in ``out_dir`` (call it last).

    ``digests`` are the tensors' sha256 by file and tensor as `write_weights` returns them, hashed as each
    tensor was put in place (see `output_files.OutputFiles`)."""
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for path in sorted(out_dir.iterdir()):
        if path.name in (MANIFEST, META):
            continue
        if path.suffix != ".safetensors":
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            continue
        with SafetensorsFile(path) as st:
            header = hashlib.sha256(st.header()).hexdigest()
            files[path.name] = {"size": path.stat().st_size, "header_sha256": header}
            for entry in st.tensors.values():
                tensors[entry.name] = {
                    "file": path.name,
                    "dtype": entry.dtype.safetensors,
                    "shape": list(entry.shape),
                    "data_offsets": [entry.begin - st.header_size, entry.end - st.header_size],
                    "sha256": digests[path.name][entry.name],
                }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "offline-bridge", "version": _tool_version()},
        "command": command,
        "options": jsonable(dict(options)),
        "sources": sources,
        "files": files,
        "tensors": tensors,
    }
    write_json(out_dir / MANIFEST, manifest)


def load_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of ``out_dir``: a regular file of at most `JSON_LIMIT` bytes, of our version and shape."""
    file = Path(out_dir) / MANIFEST
    if not Path(out_dir).is_dir():
        missing = not os.path.lexists(out_dir)
        raise CheckpointError(f"{out_dir}: {'no such directory' if missing else 'not a directory, so no manifest'}")
    if not os.path.lexists(file):
        raise CheckpointError(f"{file}: no manifest; only directories written by convert / export-adapter have one")
    manifest = load_json(file, JSON_LIMIT, "manifest")
    if (
        not isinstance(manifest, dict)
        or manifest.get("manifest_version") != MANIFEST_VERSION
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("tensors"), dict)
        or not all(isinstance(v, dict) for v in (*manifest["files"].values(), *manifest["tensors"].values()))
    ):
        raise CheckpointError(f"{file}: not an offline-bridge manifest of version {MANIFEST_VERSION}")
    return manifest


def verify(out_dir: str | Path) -> list[str]:
    """Every difference between ``out_dir`` and its manifest (empty: intact)."""
    out = Path(out_dir)
    manifest = load_manifest(out)
    problems = []
    present = {p.name for p in out.iterdir() if p.name != MANIFEST}
    for name in sorted(present - manifest["files"].keys()):
        problems.append(f"{clip(name)}: file not in the manifest")
    for name, entry in sorted(manifest["files"].items()):
        path = out / name
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\0" in name:
            problems.append(f"{quote(name)}: not a plain file name; the manifest was edited")
        elif name not in present:
            problems.append(f"{clip(name)}: missing")
        elif (size := _regular_size(path)) != entry.get("size"):
            problems.append(f"{name}: {size} bytes, the manifest says {quote(entry.get('size'))}")
        elif "header_sha256" in entry:
            problems += _verify_safetensors(path, entry, manifest["tensors"])
        elif sha256_file(path, None, "output file") != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs")
    return problems


def _regular_size(path: Path) -> int:
    """The size of an output file; one that is not a regular file (a directory, FIFO, device, dangling link)
    is an error: verify reads only what convert writes, and never opens anything that could block."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: listed in the manifest, cannot be read ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: listed in the manifest as a file, but not a regular file")
    return info.st_size


def _verify_safetensors(path: Path, entry: Mapping[str, Any], tensors: Mapping[str, Any]) -> list[str]:
    try:
        st = SafetensorsFile(path)
    except CheckpointError as exc:
        return [f"{path.name}: header unreadable ({exc})"]
    with st:
        problems = []
        if hashlib.sha256(st.header()).hexdigest() != entry["header_sha256"]:
            problems.append(f"{path.name}: header sha256 differs")
        expected = {name: t for name, t in tensors.items() if t.get("file") == path.name}
        for name in sorted(st.tensors.keys() - expected.keys()):
            problems.append(f"{path.name}: tensor {clip(name)} not in the manifest")
        for name, recorded in sorted(expected.items()):
            found = st.tensors.get(name)
            if found is None:
                problems.append(f"{path.name}: tensor {clip(name)} missing")
            elif [found.dtype.safetensors, list(found.shape)] != [recorded.get("dtype"), recorded.get("shape")]:
                problems.append(f"{path.name}: tensor {clip(name)} is {found.dtype.safetensors}{list(found.shape)}")
            elif st.sha256(name) != recorded.get("sha256"):
                problems.append(f"{path.name}: tensor {clip(name)}: sha256 differs")
        return problems
