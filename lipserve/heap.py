"""Handing freed heap memory back to the system after a request (glibc's malloc_trim).

A conversion allocates and frees tens of MiB of temporary buffers (waveforms, features,
activations of a length that changes with every request). glibc keeps freed memory in its
heap for reuse; with lengths that never repeat the kept pieces rarely fit the next request.
Measured in one process, conversions 20 to 40: +28 MiB without a trim, +15 MiB with one after
each. `malloc_trim(0)` returns every whole free page to the system; it costs milliseconds,
once per request. Elsewhere than on glibc (musl, macOS) there is nothing to call, and
`trim()` says so by returning False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("lipserve.heap")

_UNSET = object()
_malloc_trim = _UNSET


def _find_malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc: no such symbol
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim() -> bool:
    """Return the heap's free pages to the system; True when glibc's malloc_trim ran."""
    global _malloc_trim
    if _malloc_trim is _UNSET:
        _malloc_trim = _find_malloc_trim()
        if _malloc_trim is None:
            log.debug("no malloc_trim in this C library; freed heap memory stays with the allocator")
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
