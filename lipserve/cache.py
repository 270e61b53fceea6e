"""A small thread-safe bounded LRU (cachetools' eviction, with hit counts), and the content hash caches are keyed by."""
from __future__ import annotations

import hashlib
import threading
from typing import Generic, TypeVar

import cachetools

V = TypeVar("V")


def content_key(data: bytes | memoryview, *parts: str) -> str:
    """sha256 of the bytes (plus any extra parts, e.g. options that change the result)."""
    h = hashlib.sha256(data)
    for p in parts:
        h.update(b"\0" + p.encode("utf-8"))
    return h.hexdigest()


class LRUCache(Generic[V]):
    """At most `maxsize` entries, the least recently used dropped first; 0 keeps nothing."""

    def __init__(self, maxsize: int):
        self.maxsize = max(0, int(maxsize))
        self._entries: cachetools.LRUCache[str, V] = cachetools.LRUCache(self.maxsize)
        self._lock = threading.Lock()  # the stages run in worker threads, several requests at once
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            if key in self._entries:
                self.hits += 1
                return self._entries[key]  # a read marks the entry as the most recently used
            self.misses += 1
            return None

    def put(self, key: str, value: V) -> None:
        if self.maxsize == 0:  # cachetools refuses an entry larger than the whole cache
            return
        with self._lock:
            self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"size": len(self._entries), "maxsize": self.maxsize, "hits": self.hits, "misses": self.misses}
