"""A small thread-safe bounded LRU, and the content hash caches are keyed by."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


def content_key(data: bytes | memoryview, *parts: str) -> str:
    """sha256 of the bytes (plus any extra parts, e.g. options that change the result)."""
    h = hashlib.sha256(data)
    for p in parts:
        h.update(b"\0" + p.encode("utf-8"))
    return h.hexdigest()


class LRUCache(Generic[V]):
    def __init__(self, maxsize: int):
        self.maxsize = max(0, int(maxsize))
        self._data: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: str, value: V) -> None:
        if self.maxsize == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        return {"size": len(self._data), "maxsize": self.maxsize, "hits": self.hits, "misses": self.misses}
