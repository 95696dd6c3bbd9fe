"""A bounded set of open handles (file descriptors, maps) shared by worker threads.

A 1.3 TB checkpoint has thousands of shard files and a conversion writes hundreds; keeping them all open
would hit the open-file limit. At most ``limit`` handles stay open, the least recently used idle one is
closed first, and a handle some thread is using is never closed under it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["HandleCache"]

K = TypeVar("K")
T = TypeVar("T")


class HandleCache(Generic[K, T]):
    """``use(key)`` lends the handle for ``key``, opening it with ``opener`` when needed."""

    def __init__(self, opener: Callable[[K], T], closer: Callable[[T], None], limit: int = 64) -> None:
        self._opener, self._closer, self._limit = opener, closer, max(1, limit)
        self._open: OrderedDict[K, T] = OrderedDict()
        self._users: dict[K, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, key: K) -> Iterator[T]:
        with self._lock:
            handle = self._open.get(key)
            if handle is None:
                handle = self._opener(key)  # under the lock: two threads never open the same key twice
                self._open[key] = handle
            self._open.move_to_end(key)
            self._users[key] = self._users.get(key, 0) + 1
            idle = [k for k in self._open if not self._users.get(k)][: max(0, len(self._open) - self._limit)]
            closing = [self._open.pop(k) for k in idle]
        for old in closing:
            self._closer(old)
        try:
            yield handle
        finally:
            with self._lock:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]

    def pop(self, key: K) -> T | None:
        """Take ``key``'s handle out of the cache (to close it for good), if it is open and idle."""
        with self._lock:
            return None if self._users.get(key) else self._open.pop(key, None)

    def close(self) -> None:
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
        for handle in handles:
            self._closer(handle)
