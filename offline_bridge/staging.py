"""OUT_DIR: checked, locked, written in a hidden directory beside it and renamed into place when complete.

An interrupted or failed run never leaves something that looks like a finished output; a killed run leaves
its `.<OUT_DIR>.partial-<pid>` behind, and the next run into the same OUT_DIR removes it. Before anything is
touched, OUT_DIR is refused when it is, lies inside or contains an input (symlinks resolved), and `--overwrite`
replaces only what is recognisably an output (our manifest, or an HF model directory). A lock beside OUT_DIR
(`.<OUT_DIR>.lock`, `fcntl.flock`) keeps a second run out while the first checks, writes and renames.
A symlink OUT_DIR is followed: the output replaces the directory it points to, the link stays. Our own
code: no library stages a directory this way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import BridgeError, OptionError
from .manifest import MANIFEST
from .small_files import JSON_LIMIT, read_small_text

__all__ = ["output_path", "staged_output"]

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_SHORT_NAME = 200  # longer OUT_DIR names are cut and hashed in the hidden names beside it
_HF_MARKERS = ("config.json", "adapter_config.json")


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` if the block succeeds, else vanishes.

    ``inputs`` are every path the run reads (None entries are skipped): OUT_DIR may not overlap any of them.
    """
    out, sources = output_path(out_dir), _resolved(inputs)
    _refuse_overlap(out, sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"{out.parent}: cannot create the directory for OUT_DIR ({exc.strerror})") from exc
    with _locked(out):
        _check_replaceable(out, overwrite)
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
            raise BridgeError(f"{out}: writing the output failed ({exc}); nothing was left behind") from exc
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


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A non-empty OUT_DIR is replaced only with ``overwrite`` and only when it is recognisably an output."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a directory")
    try:
        entries = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError as exc:
        raise OptionError(f"{out}: cannot list OUT_DIR ({exc.strerror})") from exc
    if not entries:
        return
    if not overwrite:
        raise OptionError(f"{out}: output directory is not empty; pass --overwrite to replace it")
    what = _recognised(out, entries)
    if what is None:
        listing = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise OptionError(
            f"{out}: --overwrite replaces only an earlier output ({MANIFEST}) or an HF model directory, and this "
            f"holds {listing}; remove it yourself or choose another OUT_DIR"
        )
    log.info("replacing %s (%s)", out, what)


def _recognised(out: Path, entries: list[str]) -> str | None:
    """What ``out`` is, if it is ours to replace: an earlier output, or a flat HF model directory."""
    if MANIFEST in entries:
        try:
            manifest = json.loads(read_small_text(out / MANIFEST, JSON_LIMIT, "manifest"))
            tool = manifest.get("tool") if isinstance(manifest, dict) else None
            if isinstance(tool, dict) and tool.get("name") == "offline-bridge":
                return f"an earlier output of {manifest.get('command', 'offline-bridge')}"
        except (BridgeError, ValueError, RecursionError):
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


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` (a second run fails at once, naming the holder); the lock file goes after."""
    path = out.parent / f"{_prefix(out)}lock"
    fd = _acquire(path, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a run waiting on this file sees it gone and retries
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    for _ in range(100):  # another run removed the file we locked: lock the new one
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OptionError(f"{path}: cannot create the lock file of OUT_DIR ({exc.strerror})") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OptionError(f"{path}: the lock file of OUT_DIR is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise OptionError(
                    f"{out}: another run (pid {holder}) is writing this OUT_DIR; wait for it or choose another"
                ) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OptionError(f"{path}: the lock file of OUT_DIR keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


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
