"""Cross-request batching: the frame batches of requests in flight on one replica meet in one forward.

Without it, two requests on one LipSyncer replica run their Wav2Lip batches one after the other
(each small forward leaves most of a GPU idle). `SharedForward` is what the model call goes
through instead: every request thread hands it its own batch and gets back exactly its own
slice of the output; while one forward runs, the batches that arrive queue, and the next forward
takes as many of them (oldest first) as fit under the memory budget.

Why our own batcher and not Ray Serve's `@serve.batch`: `@serve.batch` batches whole *calls* of
a deployment method, so a batch can never hold more than the replica's `max_ongoing_requests`
calls (a known limitation), every call in a batch waits for the longest one, and the lipserve
class would have to be rewritten around lists of requests inside a Ray deployment. Here the
unit is a model batch of frames: requests of any length merge for as long as they overlap, a
short one leaves as soon as its frames are done, the merge fills up to the memory budget, and
the same code runs in the one-process pipeline and tests, with no Ray import (lipserve/ never
imports Ray). Its reach is still the requests in flight on the replica, so the replica's
`max_ongoing_requests` bounds how many requests can share one forward.

A forward waits for other requests only when there are some in flight (`request()` marks them)
that have no batch queued yet, and then at most `wait_s`; a lone request never waits.
Results are the unmerged ones within floating-point tolerance (the network treats batch items
independently; only the kernels chosen for the batch size differ).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .gpu import forward_in_halves, split_outputs

log = logging.getLogger("lipserve.batching")

REGROW_AFTER = 50  # clean forwards after an out-of-memory before the batch ceiling is raised again


@dataclass
class _Job:
    inputs: tuple
    items: int
    request: int
    result: object = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchingStats:
    forwards: int = 0             # forward passes of the network
    items: int = 0                # items through them
    merged_forwards: int = 0      # forwards that served more than one request
    merged_items: int = 0         # items in those
    max_requests_per_forward: int = 0
    oom_splits: int = 0           # forwards that ran out of memory and were halved
    waited_s: float = 0.0         # time forwards spent waiting for other requests' batches

    def as_dict(self) -> dict:
        return {**self.__dict__, "waited_s": round(self.waited_s, 4)}


class SharedForward:
    """`forward(*inputs)` for many threads at once, merging their batches along dim 0.

    forward     the network call (inference mode, autocast, device sync are its business);
                takes tensors with items on dim 0, returns a tensor or a list of tensors
    merge       merge concurrent requests' batches (False: one batch per forward, in arrival order)
    max_items   items one forward may take (a number, or a function asked before each forward)
    wait_s      how long a forward may wait for requests in flight that have no batch queued
    device      where the forward runs (an out-of-memory there shrinks the batch and retries)
    """

    def __init__(self, forward: Callable, *, merge: bool, max_items: int | Callable[[], int], wait_s: float,
                 device: torch.device, name: str = "forward"):
        self.forward = forward
        self.merge = merge
        self._max_items = max_items
        self.wait_s = max(0.0, float(wait_s))
        self.device = device
        self.name = name
        self.stats = BatchingStats()
        self._cv = threading.Condition()
        self._queue: list[_Job] = []
        self._busy = False           # a thread is collecting or running a forward
        self._in_flight: set[int] = set()  # requests inside request()
        self._next_request = 0
        self._local = threading.local()
        self._oom_ceiling: int | None = None
        self._clean_since_oom = 0

    # ------------------------------------------------------------------ request bookkeeping

    @contextmanager
    def request(self):
        """Mark one request in flight for its whole model loop (so forwards know whom to wait for)."""
        with self._cv:
            self._next_request += 1
            rid = self._next_request
            self._in_flight.add(rid)
        previous = getattr(self._local, "request", None)
        self._local.request = rid
        try:
            yield rid
        finally:
            self._local.request = previous
            with self._cv:
                self._in_flight.discard(rid)
                self._cv.notify_all()

    def max_items(self) -> int:
        limit = self._max_items() if callable(self._max_items) else self._max_items
        if self._oom_ceiling is not None:
            limit = min(limit, self._oom_ceiling)
        return max(1, int(limit))

    # ------------------------------------------------------------------ the call

    def __call__(self, *inputs: torch.Tensor):
        rid = getattr(self._local, "request", None)
        job = _Job(tuple(inputs), int(inputs[0].shape[0]), rid if rid is not None else -id(inputs))
        with self._cv:
            self._queue.append(job)
            self._cv.notify_all()
            while not job.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                try:
                    batch = self._collect()
                    self._cv.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cv.acquire()
                finally:
                    self._busy = False
                    self._cv.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _collect(self) -> list[_Job]:
        """Take the next forward's jobs from the queue (lock held; may wait for requests in flight)."""
        limit = self.max_items()
        if self.merge and self.wait_s > 0:
            deadline = time.perf_counter() + self.wait_s
            started = time.perf_counter()
            while True:
                queued_requests = {j.request for j in self._queue}
                missing = self._in_flight - queued_requests
                queued_items = sum(j.items for j in self._queue)
                remaining = deadline - time.perf_counter()
                if not missing or queued_items >= limit or remaining <= 0:
                    break
                self._cv.wait(remaining)
            self.stats.waited_s += time.perf_counter() - started
        batch = [self._queue.pop(0)]
        if self.merge:
            total = batch[0].items
            while self._queue and total + self._queue[0].items <= limit:
                total += self._queue[0].items
                batch.append(self._queue.pop(0))
        return batch

    def _run(self, batch: list[_Job]) -> None:
        """One forward for the batch (lock not held); every job ends done, with a result or an error."""
        sizes = [j.items for j in batch]
        inputs = batch[0].inputs if len(batch) == 1 else tuple(
            torch.cat([j.inputs[k] for j in batch]) for k in range(len(batch[0].inputs)))
        forwards_before = self.stats.forwards
        try:
            output = forward_in_halves(self._counted_forward, inputs, self.device, limit=self.max_items(),
                                       on_oom=self._note_oom, what=self.name)
        except Exception as exc:  # handed to the callers: each re-raises it in its own thread
            if len(batch) > 1:
                # one request's bad batch must not fail the others: run each alone
                for job in batch:
                    self._run([job])
                return
            for job in batch:
                job.error, job.done = exc, True
            return
        for job, part in zip(batch, split_outputs(output, sizes)):
            job.result, job.done = part, True
        forwards = self.stats.forwards - forwards_before
        requests = len({j.request for j in batch})
        self.stats.max_requests_per_forward = max(self.stats.max_requests_per_forward, requests)
        if requests > 1:
            self.stats.merged_forwards += forwards
            self.stats.merged_items += sum(sizes)
        self._clean_since_oom += 1
        if self._oom_ceiling is not None and self._clean_since_oom >= REGROW_AFTER:
            self._oom_ceiling *= 2
            self._clean_since_oom = 0
            log.info("%s: raising the batch ceiling to %d after %d clean forwards", self.name, self._oom_ceiling,
                     REGROW_AFTER)

    def _counted_forward(self, *inputs):
        out = self.forward(*inputs)
        self.stats.forwards += 1
        self.stats.items += int(inputs[0].shape[0])
        return out

    def _note_oom(self, items: int) -> None:
        self.stats.oom_splits += 1
        self._clean_since_oom = 0
        ceiling = max(1, (items + 1) // 2)
        self._oom_ceiling = ceiling if self._oom_ceiling is None else min(self._oom_ceiling, ceiling)

    def describe(self) -> dict:
        return {"merge": self.merge, "wait_ms": round(self.wait_s * 1000, 3), "max_items": self.max_items(),
                **self.stats.as_dict()}


def merge_enabled(settings, device: torch.device) -> bool:
    """The `cross_request_batching` setting for this device: auto = on for CUDA, off on CPU (there a
    bigger Wav2Lip batch costs more per frame: 55 ms at 16, 70 ms at 64 on 2 cores; docs/FACTS.md)."""
    choice = settings.lipsync.cross_request_batching
    return choice == "on" or (choice == "auto" and device.type == "cuda")
