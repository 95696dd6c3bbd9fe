"""Progress of the tensor writes on stderr: tqdm's bar on a terminal; elsewhere (a log file, a pipe), where
a bar's `\\r` frames would pile up, one INFO line every 10% or 5 s; nothing when progress is off (--quiet).

tqdm (a well-kept library) draws the bar; the line form is ours, a few lines of arithmetic.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm import tqdm

from ..plan.schema import Plan, Target

__all__ = ["LineProgress", "Progress", "progress"]

logger = logging.getLogger(__name__)

EVERY_FRACTION = 0.1  # a line at least every 10% of the bytes ...
EVERY_SECONDS = 5.0  # ... or every 5 s, whichever comes first


class Progress(Protocol):
    def update(self, targets: Iterable[Target]) -> None: ...


def _size(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


class LineProgress:
    """One INFO line now and then: ``written 1.2 GB / 4.5 GB (27%), 12 of 40 files``."""

    def __init__(
        self, plan: Plan, files: Collection[str] | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._left: Counter[str] = Counter()  # bytes still to write, by file
        for target in plan.targets():
            if files is None or target.file in files:
                self._left[target.file] += target.nbytes
        self._total = sum(self._left.values())
        self._files = len(plan.files) if files is None else len(files)
        self._done = 0
        self._clock = clock
        self._shown_at, self._shown_bytes = clock(), 0

    def update(self, targets: Iterable[Target]) -> None:
        for target in targets:
            self._done += target.nbytes
            self._left[target.file] -= target.nbytes
        now = self._clock()
        due = self._done - self._shown_bytes >= EVERY_FRACTION * self._total or now - self._shown_at >= EVERY_SECONDS
        if due or self._done == self._total:
            self._shown_at, self._shown_bytes = now, self._done
            files = sum(1 for left in self._left.values() if left <= 0)
            percent = 100 * self._done // max(self._total, 1)
            logger.info(
                "written %s / %s (%d%%), %d of %d files",
                _size(self._done),
                _size(self._total),
                percent,
                files,
                self._files,
            )


class _Bar:
    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def update(self, targets: Iterable[Target]) -> None:
        self._bar.update(sum(t.nbytes for t in targets))


class _Silent:
    def update(self, targets: Iterable[Target]) -> None:
        pass


@contextmanager
def progress(plan: Plan, enabled: bool, files: Collection[str] | None = None) -> Iterator[Progress]:
    """What reports the writes of ``plan`` (of its ``files`` only, when given): a bar on a terminal, lines
    elsewhere, nothing if not ``enabled``."""
    if not enabled:
        yield _Silent()
    elif sys.stderr.isatty():
        total = sum(t.nbytes for t in plan.targets() if files is None or t.file in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="converting") as bar:
            yield _Bar(bar)
    else:
        yield LineProgress(plan, files)
