"""OUT_DIR: checked, locked, written in a hidden directory beside it and renamed into place when complete.

An interrupted or failed run never leaves something that looks like a finished output; a killed run leaves
its `.<OUT_DIR>.partial-<pid>` behind, and the next run into the same OUT_DIR removes it. Before anything is
touched, OUT_DIR is refused when it is, lies inside or contains an input (symlinks resolved), and `--overwrite`
replaces only what is recognisably an output (our manifest, or an HF model directory). A lock beside OUT_DIR
(`offline_bridge.write.output_lock`) keeps a second run out from before the checkpoint is read (`convert`,
`export-adapter`) until the output is in place.
A symlink OUT_DIR is followed: the output replaces the directory it points to, the link stays. Our own
code: no library stages a directory this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import CheckpointError, OptionError, OutputError
from ..files.small_files import JSON_LIMIT, read_small_text
from .manifest import MANIFEST
from .output_lock import OutputLock

__all__ = ["OutputDir", "output_path"]

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_SHORT_NAME = 200  # longer OUT_DIR names are cut and hashed in the hidden names beside it
_HF_MARKERS = ("config.json", "adapter_config.json")


class OutputDir:
    """OUT_DIR of one run, from before the checkpoint is read until the output is in place.

    1. Entering checks OUT_DIR against the inputs named so far and, when its parent exists, takes the lock
       and refuses a non-empty OUT_DIR without ``overwrite``: a second run fails before reading anything.
    2. `staged` checks again with the inputs the readers found (a base named by run_config.yaml), creates
       the parent and takes the lock if not yet, and yields the staging directory.
    3. Leaving releases the lock.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
        self.path = output_path(out_dir)
        self._overwrite = overwrite
        self._sources = _resolved(inputs)
        self._lock = OutputLock(self.path.parent / f"{_prefix(self.path)}lock", self.path)

    def __enter__(self) -> OutputDir:
        _refuse_overlap(self.path, self._sources)
        if self.path.parent.is_dir():
            self._lock.acquire()
            try:
                if not self._overwrite:  # what --overwrite may replace is judged once every input is known
                    _replaced(self.path, overwrite=False)
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def staged(self, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
        """Yield a temporary directory that becomes OUT_DIR if the block succeeds, else vanishes."""
        out, sources = self.path, self._sources + _resolved(inputs)
        _refuse_overlap(out, sources)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"{out.parent}: cannot create the directory for OUT_DIR ({exc.strerror})") from exc
        if not self._lock.held:
            self._lock.acquire()
        replaced = _replaced(out, self._overwrite)
        if replaced is not None:
            log.info("replacing %s (%s)", out, replaced)
        _remove_abandoned(out, [source for _, source in sources])
        staging = out.parent / f"{_prefix(out)}partial-{os.getpid()}"
        _refuse_overlap(staging, sources)
        shutil.rmtree(staging, ignore_errors=True)
        old = None
        try:
            staging.mkdir()
            yield staging
            if out.exists():
                old = out.parent / f"{_prefix(out)}old-{os.getpid()}"
                out.rename(old)
            staging.rename(out)
        except OSError as exc:  # disk full, permissions, ...: the staging directory goes, the error stays one line
            raise OutputError(f"{out}: writing the output failed ({exc}); nothing was left behind") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            try:
                shutil.rmtree(old)
            except OSError as exc:  # the new output is in place; the old one is named as such
                log.warning("%s: could not remove the replaced output %s (%s)", out, old, exc.strerror)


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


def _resolved(inputs: Iterable[str | Path | None]) -> list[tuple[Path, Path]]:
    """(as given, resolved) for every input path."""
    pairs = []
    for given in (Path(p) for p in inputs if p is not None):
        try:
            pairs.append((given, given.resolve()))
        except (OSError, RuntimeError) as exc:  # a link loop
            raise OptionError(f"{given}: cannot resolve the input ({exc})") from exc
    return pairs


def _overlap(path: Path, source: Path) -> str | None:
    """How ``path`` overlaps ``source`` (both resolved), if it does."""
    if path == source:
        return "is"
    if path.is_relative_to(source):
        return "lies inside"
    return "contains" if source.is_relative_to(path) else None


def _refuse_overlap(out: Path, inputs: list[tuple[Path, Path]]) -> None:
    """OUT_DIR is replaced whole: it may not be an input, lie inside one, or hold one."""
    for given, source in inputs:
        relation = _overlap(out, source)
        if relation is not None:
            raise OptionError(f"{out}: OUT_DIR {relation} the input {given}; choose an OUT_DIR outside every input")


def _replaced(out: Path, overwrite: bool) -> str | None:
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


def _prefix(out: Path) -> str:
    """The start of every hidden name beside ``out``: `.<name>.`, the name cut and hashed when long."""
    raw = os.fsencode(out.name)
    if len(raw) <= _SHORT_NAME:
        return f".{out.name}."
    return f".{os.fsdecode(raw[:_SHORT_NAME])}~{hashlib.sha256(raw).hexdigest()[:16]}."


def _remove_abandoned(out: Path, sources: list[Path]) -> None:
    """Delete staging / old directories of earlier runs into ``out`` whose process is gone (killed); never an
    input that happens to be named like one."""
    prefix = _prefix(out)
    for leftover in [p for p in out.parent.iterdir() if p.name.startswith(prefix)]:
        kind, _, pid = leftover.name[len(prefix) :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isascii() or not pid.isdigit() or _alive(int(pid)):
            continue
        if any(_overlap(leftover, source) for source in sources):
            continue
        if kind == "old" and not out.exists():  # killed between the two renames: the old output is the output
            leftover.rename(out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone; or a number no process can have
        return False
    except PermissionError:  # someone else's process
        return True
    return True
