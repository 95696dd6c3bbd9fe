"""`offline-bridge.json`: what an output directory was made from and with, and the hash of every byte in it.

Written last into the staging directory by `convert` and `export-adapter`; `verify` recomputes it. It
holds no timestamps and no absolute paths, so the same input and options give the same manifest on any
machine. See formats/manifest.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .readers.base import CheckpointReader
from .readers.combined import CombinedReader
from .safetensors_file import SafetensorsFile
from .writer import write_json

__all__ = [
    "MANIFEST",
    "args_digest",
    "canonical",
    "describe_sources",
    "fingerprint",
    "load_manifest",
    "sha256_file",
    "verify",
    "write_manifest",
]

MANIFEST = "offline-bridge.json"
MANIFEST_VERSION = 1
# Files whose bytes say what the checkpoint is (hashed); every other file is recorded by size only, so a
# fingerprint never re-reads the tensor data.
_HASHED = {".metadata", "common.pt", "metadata.json", "run_config.yaml", ".zarray", "model_optim_rng.pt", "config.json"}
_CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def canonical(value: Any) -> Any:
    """A JSON-able form whose text does not depend on set order or object identity."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=repr)
    if isinstance(value, argparse.Namespace) or hasattr(value, "__dict__"):
        return {"type": type(value).__name__, **canonical(vars(value))}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def args_digest(args: argparse.Namespace | None) -> str | None:
    """sha256 of the Megatron args as canonical JSON (None when the checkpoint saved none)."""
    if args is None:
        return None
    try:
        text = json.dumps(canonical(vars(args)), sort_keys=True, separators=(",", ":"), default=repr)
    except RecursionError:
        raise CheckpointError("the checkpoint's args nest too deeply (a self-referencing pickle?)") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _iteration(directory: Path) -> str:
    match = re.fullmatch(r"iter_(\d+)", directory.name)
    return str(int(match.group(1))) if match else directory.name


def fingerprint(reader: CheckpointReader, role: str) -> dict[str, Any]:
    """Format, iteration, the checkpoint's files (metadata hashed, data by size) and its args' hash."""
    files = {}
    for path in sorted(p for p in reader.path.rglob("*") if p.is_file()):
        name = path.relative_to(reader.path).as_posix()
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if path.name in _HASHED:
            entry["sha256"] = sha256_file(path)
        files[name] = entry
    return {
        "role": role,
        "format": reader.format,
        "iteration": _iteration(reader.path),
        "args_sha256": args_digest(reader.args),
        "files": files,
    }


def describe_sources(reader: CheckpointReader, hf_config: str | Path | None = None) -> list[dict[str, Any]]:
    """Fingerprints of everything a conversion read: the checkpoint (or base and adapter) and --hf-config."""
    if isinstance(reader, CombinedReader):
        sources = [fingerprint(reader.base, "base"), fingerprint(reader.adapter, "adapter")]
    else:
        sources = [fingerprint(reader, "checkpoint")]
    if hf_config is not None:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        sources.append({"role": "hf_config", "format": "json", "files": {path.name: {"sha256": sha256_file(path)}}})
    return sources


def _tool_version() -> str:
    from . import __version__

    return __version__


def write_manifest(
    out_dir: Path,
    command: str,
    options: Mapping[str, Any],
    sources: list[dict[str, Any]],
    digests: Mapping[tuple[str, str], str],
) -> None:
    """Write `offline-bridge.json` for the files now in ``out_dir`` (call it last).

    ``digests`` are the tensors' sha256 by (file, tensor) as `write_weights` returns them, hashed as each
    tensor was put in place (see `writer.OutputFiles`)."""
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for path in sorted(out_dir.iterdir()):
        if path.name == MANIFEST:
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
                    "sha256": digests[path.name, entry.name],
                }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "offline-bridge", "version": _tool_version()},
        "command": command,
        "options": canonical(dict(options)),
        "sources": sources,
        "files": files,
        "tensors": tensors,
    }
    write_json(out_dir / MANIFEST, manifest)


def load_manifest(out_dir: Path) -> dict[str, Any]:
    file = Path(out_dir) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{file}: no manifest; only directories written by convert / export-adapter have one")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: unreadable manifest ({exc})") from exc
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
        problems.append(f"{name}: file not in the manifest")
    for name, entry in sorted(manifest["files"].items()):
        path = out / name
        if Path(name).name != name or name == MANIFEST:
            problems.append(f"{name}: not a plain file name; the manifest was edited")
        elif name not in present:
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif "header_sha256" in entry:
            problems += _verify_safetensors(path, entry, manifest["tensors"])
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs")
    return problems


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
            problems.append(f"{path.name}: tensor {name} not in the manifest")
        for name, recorded in sorted(expected.items()):
            found = st.tensors.get(name)
            if found is None:
                problems.append(f"{path.name}: tensor {name} missing")
            elif [found.dtype.safetensors, list(found.shape)] != [recorded.get("dtype"), recorded.get("shape")]:
                problems.append(f"{path.name}: tensor {name} is {found.dtype.safetensors}{list(found.shape)}")
            elif st.sha256(name) != recorded.get("sha256"):
                problems.append(f"{path.name}: tensor {name}: sha256 differs")
        return problems
