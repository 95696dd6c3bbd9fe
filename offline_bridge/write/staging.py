"""OUT_DIR: checked, locked, written in a hidden directory beside it and renamed into place when complete.

An interrupted or failed run never leaves something that looks like a finished output; a killed run leaves
its `.<OUT_DIR>.partial-<pid>` behind, and the next run into the same OUT_DIR removes it (or, with `--resume`,
takes it over). Before anything is touched, OUT_DIR is checked (`out_paths`): not overlapping an input, and
replaced with `--overwrite` only when it is recognisably an output. A lock beside OUT_DIR
(`offline_bridge.write.output_lock`) keeps a second run out from before the checkpoint is read (`convert`,
`export-adapter`) until the output is in place.
A symlink OUT_DIR is followed: the output replaces the directory it points to, the link stays. Our own
code: no library stages a directory this way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OptionError, OutputError
from .completed import META
from .out_paths import hidden_prefix, output_path, overlap, refuse_overlap, replaced, resolved
from .output_lock import OutputLock

__all__ = ["OutputDir"]

log = logging.getLogger(__name__)


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
        self._sources = resolved(inputs)
        self._lock = OutputLock(self.path.parent / f"{hidden_prefix(self.path)}lock", self.path)

    def __enter__(self) -> OutputDir:
        refuse_overlap(self.path, self._sources)
        if self.path.parent.is_dir():
            self._lock.acquire()
            try:
                if not self._overwrite:  # what --overwrite may replace is judged once every input is known
                    replaced(self.path, overwrite=False)
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def staged(self, inputs: Iterable[str | Path | None] = (), resume: bool = False) -> Iterator[Path]:
        """Yield a temporary directory that becomes OUT_DIR if the block succeeds, else vanishes. With
        ``resume``, a killed run's staging directory is taken over instead of removed (its complete files are
        kept by the caller, see `completed`)."""
        out, sources = self._prepared(inputs)
        staging = out.parent / f"{hidden_prefix(out)}partial-{os.getpid()}"
        refuse_overlap(staging, sources)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            abandoned = _remove_abandoned(out, [source for _, source in sources], resume)
            if abandoned is not None:
                log.info("resuming in %s", abandoned)
                abandoned.rename(staging)
            else:
                staging.mkdir()
            yield staging
            old = self._put_in_place(staging)
        except OSError as exc:  # disk full, permissions, ...: the staging directory goes, the error stays one line
            raise OutputError(f"{out}: writing the output failed ({exc}); nothing was left behind") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_old(out, old)

    @contextlib.contextmanager
    def adopted(self, area: Path) -> Iterator[Path]:
        """Yield ``area`` (the parts other processes wrote); it becomes OUT_DIR if the block succeeds, and stays
        as it is if not, for another try."""
        out, _ = self._prepared(())
        try:
            yield area
            old = self._put_in_place(area)
        except OSError as exc:
            raise OutputError(f"{out}: putting the output in place failed ({exc}); {area} is kept") from exc
        _remove_old(out, old)

    def _prepared(self, inputs: Iterable[str | Path | None]) -> tuple[Path, list[tuple[Path, Path]]]:
        """OUT_DIR checked against every input, its parent created, locked, and what it held judged."""
        out, sources = self.path, self._sources + resolved(inputs)
        refuse_overlap(out, sources)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"{out.parent}: cannot create the directory for OUT_DIR ({exc.strerror})") from exc
        if not self._lock.held:
            self._lock.acquire()
        what = replaced(out, self._overwrite)
        if what is not None:
            log.info("replacing %s (%s)", out, what)
        return out, sources

    def _put_in_place(self, directory: Path) -> Path | None:
        """Rename ``directory`` (its bookkeeping removed) to OUT_DIR; the replaced output's new name, if any."""
        out, old = self.path, None
        shutil.rmtree(directory / META, ignore_errors=True)  # `--resume` bookkeeping, never part of the output
        if out.exists():
            old = out.parent / f"{hidden_prefix(out)}old-{os.getpid()}"
            out.rename(old)
        directory.rename(out)
        return old


def _remove_old(out: Path, old: Path | None) -> None:
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as exc:  # the new output is in place; the old one is named as such
            log.warning("%s: could not remove the replaced output %s (%s)", out, old, exc.strerror)


def _remove_abandoned(out: Path, sources: list[Path], resume: bool = False) -> Path | None:
    """Delete staging / old directories of earlier runs into ``out`` whose process is gone (killed); never an
    input that happens to be named like one. With ``resume``, the newest abandoned staging directory is
    returned instead of deleted."""
    prefix = hidden_prefix(out)
    partial = []
    for leftover in [p for p in out.parent.iterdir() if p.name.startswith(prefix)]:
        kind, _, pid = leftover.name[len(prefix) :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isascii() or not pid.isdigit() or _alive(int(pid)):
            continue
        if any(overlap(leftover, source) for source in sources):
            continue
        if kind == "old" and not out.exists():  # killed between the two renames: the old output is the output
            leftover.rename(out)
        elif kind == "partial" and resume:
            partial.append(leftover)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    partial.sort(key=lambda p: p.stat().st_mtime_ns)
    for leftover in partial[:-1]:
        shutil.rmtree(leftover, ignore_errors=True)
    return partial[-1] if partial else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone; or a number no process can have
        return False
    except PermissionError:  # someone else's process
        return True
    return True
