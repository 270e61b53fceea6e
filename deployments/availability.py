"""Which stages have a replica to run a request, as Serve's controller sees it.

While no node can host a stage (its node lost, its replacement not placed yet), Serve's handle
keeps a call to it queued until a replica appears: a request would hang for the whole request
timeout. The ingress asks the controller once a second how many replicas of each stage can take
a call (SERVING_STATES), and refuses a new request at once with 503 `stage_unavailable` naming the stage while one
has none; /health says so without asking the stage. It refuses only on a fresh answer that a
stage has none: when the controller does not answer (the GCS frozen, the head lost), it lets
requests through, since the replicas that run may well answer them. The poll only says which
requests to look at twice: a refusal needs the controller's answer to an ask that began after the
request came (shared by a burst of refusals). An older answer, even one just in, may predate the
replacement replica, and a failed ask says nothing.
"""
from __future__ import annotations

import asyncio
import logging
import time

from lipserve.errors import StageUnavailable

log = logging.getLogger("lipserve.ingress")

POLL_PERIOD_S = 1.0
STALE_AFTER_S = 10.0  # an answer older than this says nothing (the controller is not answering)
ASK_TIMEOUT_S = 5.0
# the replica states Serve's router sends calls to (a replica Serve keeps on a draining node until
# its replacement runs is PENDING_MIGRATION)
SERVING_STATES = ("RUNNING", "PENDING_MIGRATION")


def running_replicas(app_name: str) -> dict[str, int]:
    """Deployment -> replicas of `app_name` that take calls, from the controller (a blocking call)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: sum(int(d.replica_states.get(state, 0)) for state in SERVING_STATES)
            for name, d in app.deployments.items()}


class StageAvailability:
    """`check()` raises StageUnavailable for a stage the controller last said has no running
    replica; `missing()` lists them. The poll runs in the background once started."""

    def __init__(self, app_name: str, deployments: tuple[str, ...], ask=running_replicas, clock=time.monotonic):
        self.app_name, self.deployments, self.ask, self.clock = app_name, deployments, ask, clock
        self.running: dict[str, int] = {}
        self.seen_at: float | None = None  # when the last answered ask began (its snapshot is no older)
        self._task: asyncio.Task | None = None
        self._asking: asyncio.Task | None = None  # the ask in flight, shared by whoever waits for one
        self._asking_since = 0.0  # when that ask began

    def start(self) -> None:
        """Start polling (idempotent; needs the replica's running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def refresh(self) -> None:
        """Ask the controller once; a slow or failing answer leaves the last one to go stale."""
        began = self.clock()
        try:
            running = await asyncio.wait_for(asyncio.to_thread(self.ask, self.app_name), ASK_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("the Serve controller did not say within %.0f s which replicas run", ASK_TIMEOUT_S)
            return
        except Exception as exc:  # the controller restarting or unreachable: logged, the answer goes stale
            log.warning("the Serve controller could not say which replicas run: %s", type(exc).__name__)
            return
        self.running, self.seen_at = running, began

    async def _ask_once(self) -> None:
        """Refresh, sharing an ask already in flight (a burst of refusals asks the controller once)."""
        if self._asking is None or self._asking.done():
            self._asking_since = self.clock()
            self._asking = asyncio.get_running_loop().create_task(self.refresh())
        await asyncio.shield(self._asking)

    async def _poll(self) -> None:
        while True:
            await self._ask_once()
            await asyncio.sleep(POLL_PERIOD_S)

    def missing(self) -> list[str]:
        """The stages with no running replica, by a fresh answer; none when there is none."""
        if self.seen_at is None or self.clock() - self.seen_at > STALE_AFTER_S:
            return []
        return [name for name in self.deployments if self.running.get(name, 0) == 0]

    async def confirmed_missing(self) -> list[str]:
        """missing(), as the controller says when asked after this call; none when it does not
        answer. The poll's answer is older, and a replica just back must not be refused."""
        if not self.missing():
            return []
        called_at = self.clock()
        await self._ask_once()
        if self.seen_at < called_at and self._asking_since < called_at:
            await self._ask_once()  # the shared ask began before this call: its snapshot may predate the replica
        if self.seen_at < called_at:
            return []  # no answer from after this call: nothing is known, nothing refused
        return self.missing()

    async def check(self) -> None:
        missing = await self.confirmed_missing()
        if missing:
            stage = missing[0]
            raise StageUnavailable(f"no {stage} replica is running (its node was lost, or its replacement is "
                                   "still starting); Serve is starting one, retry later", stage=stage)
