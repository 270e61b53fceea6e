"""A blocking generator stepped from asyncio, always on one thread of its own.

Why one thread: a lip-sync stream renders its frames inside the generator, and the shared
Wav2Lip forward (lipserve.batching) knows which request a batch belongs to by thread; stepping
the generator on whichever worker thread is free would lose that."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

_END = object()


async def iterate_in_thread(items: Iterator, name: str = "stream") -> AsyncIterator:
    """Each item of `items`, produced on a dedicated thread; closing the async iterator early
    (the caller went away) closes the generator there too."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        while True:
            item = await loop.run_in_executor(pool, next, items, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            await loop.run_in_executor(pool, close)
        pool.shutdown(wait=False)
