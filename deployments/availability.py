"""Which stages have a replica to run a request, as Serve's controller sees it.

While no node can host a stage (its node lost, its replacement not placed yet), Serve's handle
keeps a call to it queued until a replica appears: a request would hang for the whole request
timeout. The ingress asks the controller once a second how many replicas of each stage can take
a call (SERVING_STATES), and refuses a new request at once with 503 `stage_unavailable` naming the
stage while one has none and no live node can host its replacement; /health says so without
asking the stage. When a replacement is starting and a live, undrained node can host it (a node
drained for preemption: Ray Serve 2.60 stops the old replica at once, before the new one runs), a
request waits for it instead, up to `replacement_wait_s`, and is refused by name only after that. It refuses only on a fresh answer that a
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
from dataclasses import dataclass

from lipserve.errors import StageUnavailable

log = logging.getLogger("lipserve.ingress")

POLL_PERIOD_S = 1.0
STALE_AFTER_S = 10.0  # an answer older than this says nothing (the controller is not answering)
ASK_TIMEOUT_S = 5.0
# the replica states Serve's router sends calls to (a replica Serve keeps on a draining node until
# its replacement runs is PENDING_MIGRATION)
SERVING_STATES = ("RUNNING", "PENDING_MIGRATION")
HOLD_POLL_S = 0.5  # how often a waiting request asks whether the replacement runs


@dataclass(frozen=True)
class StageReplicas:
    serving: int  # replicas Serve's router sends calls to
    replacement_coming: bool = False  # one is STARTING and a live, undrained node can host it


def can_host(actor_options: dict, nodes: list[dict], draining: set[str]) -> bool:
    """Whether one of `nodes` (ray.nodes() rows) is alive, not draining, and has in total what a
    replica with `actor_options` (Serve's ray_actor_options) asks for."""
    wanted = {"CPU": actor_options.get("num_cpus") or 0, "GPU": actor_options.get("num_gpus") or 0,
              "memory": actor_options.get("memory") or 0, **(actor_options.get("resources") or {})}
    return any(node.get("Alive") and node.get("NodeID") not in draining
               and all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in wanted.items() if amount)
               for node in nodes)


def cluster_nodes() -> tuple[list[dict], set[str]]:
    """ray.nodes(), and the ids of the nodes being drained (as Serve's controller reads them)."""
    import ray
    from ray._private.state import state

    return ray.nodes(), set(state.get_draining_nodes())


def stage_replicas(app_name: str, nodes=cluster_nodes) -> dict[str, StageReplicas]:
    """Deployment -> its StageReplicas in `app_name`, from the controller (a blocking call). It is
    the controller's one answer that serve.status() reads too, with each deployment's actor options
    kept; the nodes are asked only for a stage with nothing serving and a replica starting."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    app = ((client.get_serve_details() if client is not None else {}).get("applications") or {}).get(app_name)
    if app is None:
        return {}
    seen: dict[str, StageReplicas] = {}
    for name, deployment in app["deployments"].items():
        states = [replica["state"] for replica in deployment.get("replicas", [])]
        serving = sum(state in SERVING_STATES for state in states)
        coming = False
        if serving == 0 and "STARTING" in states:
            actor_options = (deployment.get("deployment_config") or {}).get("ray_actor_options") or {}
            coming = can_host(actor_options, *nodes())
        seen[name] = StageReplicas(serving, coming)
    return seen


class StageAvailability:
    """`check()` raises StageUnavailable for a stage the controller says has no running replica
    (after waiting for one that is coming); `missing()` lists them. The poll runs in the
    background once started."""

    def __init__(self, app_name: str, deployments: tuple[str, ...], ask=stage_replicas, clock=time.monotonic):
        self.app_name, self.deployments, self.ask, self.clock = app_name, deployments, ask, clock
        self.replicas: dict[str, StageReplicas] = {}
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
        self.replicas, self.seen_at = running, began

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
        return [name for name in self.deployments if self.replicas.get(name, StageReplicas(0)).serving == 0]

    def coming(self, stage: str) -> bool:
        """Whether, by the last answer, `stage` has a replacement starting that a live node can host."""
        return self.replicas.get(stage, StageReplicas(0)).replacement_coming

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

    async def check(self, wait_s: float = 0.0) -> None:
        """Refuse (StageUnavailable) while a stage has no running replica. One whose replacement is
        coming is waited for up to `wait_s`; with 0 it is let through (a job, whose call Serve's
        handle keeps queued until the replica runs, within the job's own timeout)."""
        missing = await self.confirmed_missing()
        waited_from, told = self.clock(), False
        while missing:
            lost = [stage for stage in missing if not self.coming(stage)]
            if lost:
                raise StageUnavailable(f"no {lost[0]} replica is running and no live node can host one yet (its "
                                       "node was lost); Serve starts one when a node can, retry later", stage=lost[0])
            if wait_s <= 0:
                return
            if self.clock() - waited_from >= wait_s:
                raise StageUnavailable(f"no {missing[0]} replica is running: its replacement did not start within "
                                       f"replacement_wait_s ({wait_s:g} s); retry later", stage=missing[0])
            if not told:
                log.info("a request waits for the replacement replica of %s, which is starting", ", ".join(missing))
                told = True
            await asyncio.sleep(HOLD_POLL_S)
            missing = await self.confirmed_missing()
