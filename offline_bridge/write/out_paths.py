"""What OUT_DIR may be, before anything is written: a path we can create and replace (a symlink followed), not
overlapping any input, and, when not empty, recognisably an earlier output that `--overwrite` may replace.
Also the hidden names beside it (staging, parts, lock). Our own code: these are our rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError, OptionError
from ..files.small_files import JSON_LIMIT, read_small_text
from .manifest import MANIFEST

__all__ = ["NAME_MAX", "hidden_prefix", "output_path", "overlap", "refuse_overlap", "replaced", "resolved"]

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_SHORT_NAME = 200  # longer OUT_DIR names are cut and hashed in the hidden names beside it
_HF_MARKERS = ("config.json", "adapter_config.json")


def output_path(out_dir: str | Path) -> Path:
    """OUT_DIR as the directory we will replace: its parent resolved, a symlink followed to its target."""
    given = Path(out_dir)
    if given.name in ("", ".."):
        raise OptionError(f"{out_dir}: OUT_DIR must name a directory to create (not ., .. or /)")
    if len(os.fsencode(given.name)) > NAME_MAX:
        raise OptionError(f"{given.name[:40]}...: OUT_DIR's name is longer than {NAME_MAX} bytes")
    try:
        if given.is_symlink():
            target = given.resolve(strict=True)
            if not target.is_dir() or target.name in ("", ".."):
                raise OptionError(f"{given}: OUT_DIR is a symlink to {target}, which is not a directory to replace")
            log.info("%s is a symlink: writing to %s", given, target)
            return target
        return given.parent.resolve() / given.name
    except (OSError, RuntimeError) as exc:  # a link loop, a dangling link
        raise OptionError(f"{given}: cannot resolve OUT_DIR ({exc})") from exc


def resolved(inputs: Iterable[str | Path | None]) -> list[tuple[Path, Path]]:
    """(as given, resolved) for every input path."""
    pairs = []
    for given in (Path(p) for p in inputs if p is not None):
        try:
            pairs.append((given, given.resolve()))
        except (OSError, RuntimeError) as exc:  # a link loop
            raise OptionError(f"{given}: cannot resolve the input ({exc})") from exc
    return pairs


def overlap(path: Path, source: Path) -> str | None:
    """How ``path`` overlaps ``source`` (both resolved), if it does."""
    if path == source:
        return "is"
    if path.is_relative_to(source):
        return "lies inside"
    return "contains" if source.is_relative_to(path) else None


def refuse_overlap(out: Path, inputs: list[tuple[Path, Path]]) -> None:
    """OUT_DIR is replaced whole: it may not be an input, lie inside one, or hold one."""
    for given, source in inputs:
        relation = overlap(out, source)
        if relation is not None:
            raise OptionError(f"{out}: OUT_DIR {relation} the input {given}; choose an OUT_DIR outside every input")


def replaced(out: Path, overwrite: bool) -> str | None:
    """What a non-empty OUT_DIR holds, if it may be replaced: only with ``overwrite``, and only when it is
    recognisably an output (None: nothing to replace)."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a directory")
    try:
        entries = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError as exc:
        raise OptionError(f"{out}: cannot list OUT_DIR ({exc.strerror})") from exc
    if not entries:
        return None
    if not overwrite:
        raise OptionError(f"{out}: output directory is not empty; pass --overwrite to replace it")
    what = _recognised(out, entries)
    if what is None:
        listing = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise OptionError(
            f"{out}: --overwrite replaces only an earlier output ({MANIFEST}) or an HF model directory, and this "
            f"holds {listing}; remove it yourself or choose another OUT_DIR"
        )
    return what


def _recognised(out: Path, entries: list[str]) -> str | None:
    """What ``out`` is, if it is ours to replace: an earlier output, or a flat HF model directory."""
    if MANIFEST in entries:
        try:
            manifest = json.loads(read_small_text(out / MANIFEST, JSON_LIMIT, "manifest"))
            tool = manifest.get("tool") if isinstance(manifest, dict) else None
            if isinstance(tool, dict) and tool.get("name") == "offline-bridge":
                return f"an earlier output of {manifest.get('command', 'offline-bridge')}"
        except (CheckpointError, ValueError, RecursionError):
            pass
    files_only = all(stat.S_ISREG(os.lstat(out / name).st_mode) for name in entries)
    if files_only and any(marker in entries for marker in _HF_MARKERS):
        return f"an HF model directory of {len(entries)} files"
    return None


def hidden_prefix(out: Path) -> str:
    """The start of every hidden name beside ``out``: `.<name>.`, the name cut and hashed when long."""
    raw = os.fsencode(out.name)
    if len(raw) <= _SHORT_NAME:
        return f".{out.name}."
    return f".{os.fsdecode(raw[:_SHORT_NAME])}~{hashlib.sha256(raw).hexdigest()[:16]}."
