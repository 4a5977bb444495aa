"""A small thread-safe LRU memo: the worker's and the server's caches of models,
partitions and bundles."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``maxsize`` entries; the least recently used one goes first.

    ``get_or_create(key, make)`` calls ``make()`` outside the lock, so a slow build (a
    model from bytes) does not block readers of other keys; when two threads build the
    same key at once, the first one stored wins and both get it.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"Expected maxsize >= 1. Received: maxsize={maxsize}")
        self.maxsize = int(maxsize)
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return default

    def put(self, key: K, value: V) -> V:
        """Store ``value`` (or keep the value already stored under ``key``) and return it."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value

    def get_or_create(self, key: K, make: Callable[[], V]) -> V:
        hit = self.get(key)
        if hit is not None:
            return hit
        return self.put(key, make())

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def keys(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._data))
