"""POST /api/v1/lip-video/stream: the answer as fragmented MP4, sent while it is being made.

The request runs as on /api/v1/lip-video (the same checks, gate, stages and atomic write); its
pieces come through a short queue. Until the first piece is there, a failure is the route's JSON
error (400 ... 503), as on the whole answer. After it, the status line is sent: a failure then
ends the body without its last chunk (the connection is aborted, so a client sees an incomplete
transfer), is logged and counted with its code, and the output is not written.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from fastapi.responses import JSONResponse, StreamingResponse

log = logging.getLogger("lipserve.ingress")

QUEUED_PIECES = 8  # pieces made ahead of a slow reader before the stream waits for it


async def stream_answer(run: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable], request_id: str,
                        refuse: Callable[[BaseException], JSONResponse],
                        failed: Callable[[BaseException], object],
                        answered: Callable[[object], None]):
    """`run(send)` makes the answer (orchestrate with `send`); `refuse(exc)` is the JSON error before
    the first byte, `failed(exc)` counts one after it, `answered(response)` records a finished one."""
    pieces: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUED_PIECES)
    started = time.perf_counter()
    task = asyncio.ensure_future(run(pieces.put))
    first = asyncio.ensure_future(pieces.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        return refuse(exc if exc is not None else RuntimeError("the stream ended before its first piece"))

    async def body():
        try:
            yield first.result()
            while True:
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not pieces.empty():
                    yield pieces.get_nowait()
                exc = task.exception()
                if exc is not None:
                    err = failed(exc)
                    log.warning("request %s: stream aborted after its first piece: %s", request_id, err)
                    raise exc
                answered(task.result())
                return
        finally:
            if not task.done():  # the caller went away: stop making the answer (nothing is written)
                task.cancel()

    headers = {"Cache-Control": "no-store",  # X-Request-ID: the edge adds it to every answer
               "X-Lipserve-First-Piece-S": f"{time.perf_counter() - started:.3f}"}
    return StreamingResponse(body(), media_type="video/mp4", headers=headers)
