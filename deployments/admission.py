"""How many requests this ingress replica runs at once, and what it is doing.

Serve's own limits sit behind this gate (max_ongoing_requests, max_queued_requests; its proxy
answers a plain 503 past them). The gate answers first, with lipserve's JSON 503 `overloaded` and
Retry-After: at most `active` requests hold a slot, at most `waiting` wait for one, the rest are
refused at once. It is a counter of slots, a counter of places waiting, and one event that wakes
the waiting when a slot is handed over: no queue of its own.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager

from lipserve.errors import Overloaded


class AdmissionGate:
    """`reserve()` takes a place synchronously (a job takes it when it is accepted, before its work
    starts); `async with` on the Admission waits for the slot, holds it, and gives it back."""

    def __init__(self, active: int, waiting: int):
        self.active, self.waiting_limit = max(1, int(active)), max(0, int(waiting))
        self.running = 0  # slots taken: held, or handed to a place that has not taken it yet
        self.waiting = 0  # places waiting for a slot
        self._handed = 0  # slots handed to the waiting places and not taken yet
        self._slot_handed = asyncio.Event()

    def reserve(self) -> "Admission":
        if self.running < self.active and not self.waiting and not self._handed:
            self.running += 1
            return Admission(self, held=True)
        if self.waiting >= self.waiting_limit:
            raise Overloaded(f"{self.active} requests running and {self.waiting} waiting; retry later")
        self.waiting += 1
        return Admission(self, held=False)

    @asynccontextmanager
    async def slot(self):
        async with self.reserve():
            yield

    def _release(self) -> None:
        """A slot is free: hand it to a waiting place, or give it back."""
        if self.waiting:
            self.waiting -= 1
            self._handed += 1
            self._slot_handed.set()
            self._slot_handed = asyncio.Event()  # the next hand-over wakes whoever still waits
        else:
            self.running -= 1

    def _take_handed(self) -> bool:
        if self._handed:
            self._handed -= 1
            return True
        return False

    async def _wait_for_slot(self) -> None:
        while not self._take_handed():
            await self._slot_handed.wait()


class Admission:
    """One request's place at the gate: a slot (held), or a place waiting for one."""

    def __init__(self, gate: AdmissionGate, held: bool):
        self.gate, self.held, self.closed = gate, held, False

    async def __aenter__(self) -> "Admission":
        if not self.held:
            try:
                await self.gate._wait_for_slot()
            except asyncio.CancelledError:
                self.close()
                raise
            self.held = True
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the place back, once: the slot if held; else the waiting place, or the slot handed to it."""
        if self.closed:
            return
        self.closed = True
        gate = self.gate
        if self.held:
            gate._release()
        elif gate.waiting:
            gate.waiting -= 1
        elif gate._take_handed():  # handed a slot it never took
            gate._release()


class InFlight:
    """Which steps the requests in this ingress are in now (fed by orchestrate's progress)."""

    def __init__(self):
        self._steps: dict[int, set[str]] = {}

    @asynccontextmanager
    async def request(self):
        steps: set[str] = set()
        self._steps[id(steps)] = steps

        def progress(step: str, event: str, seconds) -> None:
            (steps.add if event == "start" else steps.discard)(step)

        try:
            yield progress
        finally:
            del self._steps[id(steps)]

    def counts(self) -> dict[str, int]:
        return dict(Counter(step for steps in self._steps.values() for step in steps))
