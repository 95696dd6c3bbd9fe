"""When steps run: a bounded thread pool that keeps the bytes in flight within a budget, and torch held to one
thread while merges run on the pool's threads. Knows nothing of what a step does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..transform.casting import preload_torch

__all__ = ["MIN_BUDGET", "TorchThreads", "default_workers", "run_bounded"]

MIN_BUDGET = 256 * 2**20  # bytes of tensors in flight, at least (more if one step needs more)


def default_workers() -> int:
    """Threads that pay off: reads, writes and merges overlap; more than 4 only contend for the disk."""
    return max(1, min(4, os.cpu_count() or 1))


T = TypeVar("T")


class TorchThreads:
    """Merges run on the writer's threads; torch's own thread pool on top of them only makes the threads wait
    for each other (5-8x slower merges on a busy 2-core machine). torch (a second to import) starts loading
    in the background (if not yet); the first merge limits it to one thread, `restore` undoes that."""

    def __init__(self) -> None:
        preload_torch()
        self._lock = threading.Lock()
        self._before: int | None = None

    def limit(self) -> None:
        with self._lock:
            if self._before is None:
                import torch

                self._before = torch.get_num_threads()
                torch.set_num_threads(1)

    def restore(self) -> None:
        if self._before is not None:
            import torch

            torch.set_num_threads(self._before)


def run_bounded(work: Callable[[T], None], items: Iterable[T], workers: int, cost: Callable[[T], int]) -> None:
    """``work(item)`` for every item on ``workers`` threads, started in order, with the ``cost`` (bytes) of
    the items in flight kept within a budget: the costliest item, or `MIN_BUDGET` if more. The first error
    stops the submissions and is raised once the running items are done."""
    items = list(items)
    if workers <= 1:
        for item in items:
            work(item)
        return
    budget = _Budget(max([MIN_BUDGET, *(cost(item) for item in items)]))
    errors: list[BaseException] = []

    def task(item: T, need: int) -> None:
        try:
            if not errors:  # after a failure, queued items are dropped
                work(item)
        except BaseException as exc:
            errors.append(exc)
        finally:
            budget.give(need)

    with ThreadPoolExecutor(workers, thread_name_prefix="offline-bridge") as pool:
        try:
            for item in items:
                need = cost(item)
                if not budget.take(need, stop=lambda: bool(errors)):
                    break
                pool.submit(task, item, need)
        except BaseException as exc:  # an interrupt (SIGINT) in this thread: queued items are dropped too
            errors.append(exc)
            raise
    if errors:
        raise errors[0]


class _Budget:
    """Bytes in flight: `take` waits until ``need`` more fit (one item always fits), `give` returns them."""

    def __init__(self, limit: int) -> None:
        self._limit, self._used = limit, 0
        self._changed = threading.Condition()

    def take(self, need: int, stop: Callable[[], bool]) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: stop() or not self._used or self._used + need <= self._limit)
            if stop():
                return False
            self._used += need
            return True

    def give(self, need: int) -> None:
        with self._changed:
            self._used -= need
            self._changed.notify_all()
