"""lipserve.heap: freed heap memory goes back to the system after a conversion (glibc)."""
from __future__ import annotations

import ctypes.util

import numpy as np

from lipserve import heap


def _rss_anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_trim_returns_freed_heap_pages_to_the_system(monkeypatch):
    # many 256 KiB blocks (below glibc's mmap threshold once it has risen, so they live in the heap); the
    # last one stays, which keeps the heap's top from shrinking by itself: only malloc_trim releases the rest
    monkeypatch.setattr(heap, "_malloc_trim", heap._UNSET)
    big = np.ones(64 << 20, np.uint8)  # a large free raises glibc's dynamic mmap threshold past 256 KiB
    del big
    blocks = [np.ones(256 << 10, np.uint8) for _ in range(400)]  # 100 MiB
    keep = blocks[-1]
    del blocks
    before = _rss_anon_kib()
    assert heap.trim() is True
    after = _rss_anon_kib()
    assert before - after > 50 * 1024, (before, after)
    assert keep.sum() == keep.size


def test_trim_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", heap._UNSET)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert heap.trim() is False
    assert heap.trim() is False  # remembered, not looked up again
