"""Asynchronous jobs in the serving graph: where their state lives, and how a replica runs them.

State: one `lipserve.jobs.JobBook` inside a detached, named Ray actor (`JobStore`, one per Serve
application, on the head node). Every ingress replica finds it by name, so a job accepted by one
replica is readable through any other, and it outlives the replica that accepted it (a replica
killed, replaced on redeploy, or scaled down). It lives on the head node because the head also
holds Ray's control store and Serve's controller: if the head goes, the application goes with
it anyway, while a worker node can be drained or preempted without losing the book. The book is
in memory: a finished job's result stays readable for `job_retention_s`; the output video itself
is in storage and does not depend on the book. (Why not the storage: the local storage root is
not shared between nodes, and a stage update per object write would cost a GCS round trip each.)

Work: the replica that accepts a job runs it as an asyncio task (the same orchestration as the
synchronous route) and reports each stage to the book. While it has jobs it reports in every
`job_lost_after_s / 4`; a replica that dies stops reporting, and the book fails its jobs with
`job_interrupted` (503, "submit again") once `job_lost_after_s` has passed, so no job stays
'running' forever. A replica shut down gracefully first lets its jobs finish (Serve awaits the
replica's `__del__`), then fails the ones still running with the same code.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import ray

from lipserve.errors import JobInterrupted, LipserveError, StageUnavailable
from lipserve.jobs import JobBook
from lipserve.pipeline import Progress

from .errors import STAGE_LOST, classify, stage_lost

log = logging.getLogger("lipserve.jobs")

NAMESPACE = "lipserve"
# a caller's wait for the book: its first call from a replica finds the actor through Ray's GCS,
# which may be frozen or restarting with the head; the caller then gets a 503, not a hang
BOOK_TIMEOUT_S = 10.0


@ray.remote(num_cpus=0)
class JobStore:
    """The shared JobBook. A plain (not async) actor: calls run one at a time, in the order each
    caller sent them, so a job's stage reports never overtake its end."""

    def __init__(self):
        self.book = JobBook()

    def create(self, job_id: str, request_id: str, owner: str) -> dict:
        return self.book.create(job_id, request_id, owner)

    def stage(self, job_id: str, stage: str, event: str, seconds: float | None) -> None:
        self.book.stage(job_id, stage, event, seconds)

    def touch(self, job_ids: list[str]) -> None:
        self.book.touch(job_ids)

    def finish(self, job_id: str, result: dict, retention_s: float) -> None:
        self.book.finish(job_id, result, retention_s)

    def fail(self, job_id: str, error: dict, http_status: int, retention_s: float) -> None:
        self.book.fail(job_id, error, http_status, retention_s)

    def get(self, job_id: str, lost_after_s: float, retention_s: float) -> dict | None:
        return self.book.get(job_id, lost_after_s, retention_s)

    def counts(self) -> dict[str, int]:
        return self.book.counts()


def store_name(app_name: str) -> str:
    return f"lipserve-jobs-{app_name}"


def job_store(app_name: str):
    """The application's JobStore, created by whichever replica asks first (get_if_exists makes
    concurrent first calls from several replicas safe)."""
    return JobStore.options(
        name=store_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
        # restarted empty if its process dies: jobs then answer 404, their outputs are in storage
        max_restarts=-1,
    ).remote()


# work(progress) -> the response body (a dict); raises a LipserveError on failure
JobWork = Callable[[Progress], Awaitable[dict]]


class JobRunner:
    """The jobs this ingress replica runs, as asyncio tasks that report to the JobStore."""

    def __init__(self, store, owner: str):
        self.store, self.owner = store, owner
        self.tasks: dict[str, asyncio.Task] = {}
        self._reporter: asyncio.Task | None = None

    async def submit(self, job_id: str, request_id: str, work: JobWork, retention_s: float,
                     lost_after_s: float) -> dict:
        """Book the job (queued) and start it; returns its first status."""
        status = await self.ask_book("create", self.store.create.remote(job_id, request_id, self.owner))
        task = asyncio.create_task(self._run(job_id, request_id, work, retention_s))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(job_id, None))
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.create_task(self._report_in(max(0.2, lost_after_s / 4)))
        return status

    async def get(self, job_id: str, lost_after_s: float, retention_s: float) -> dict | None:
        return await self.ask_book("get", self.store.get.remote(job_id, lost_after_s, retention_s))

    @staticmethod
    async def ask_book(step: str, response):
        """A caller's call to the book: 503 stage_unavailable (stage JobStore) when it is gone or
        does not answer within BOOK_TIMEOUT_S."""
        try:
            return await asyncio.wait_for(response, BOOK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise StageUnavailable(f"the job book did not answer within {BOOK_TIMEOUT_S:g} s (Ray's control "
                                   "store may be restarting); retry later", stage="JobStore") from None
        except STAGE_LOST as exc:
            raise stage_lost("JobStore", exc, step) from exc

    async def _run(self, job_id: str, request_id: str, work: JobWork, retention_s: float) -> None:
        def progress(stage: str, event: str, seconds: float | None) -> None:
            # not awaited: the book orders it before the job's end, and the work never waits on it
            self.store.stage.remote(job_id, stage, event, seconds)

        try:
            result = await work(progress)
        except asyncio.CancelledError:
            err = JobInterrupted("the ingress replica running this job shut down before it finished; "
                                 "submit the job again")
            await self._fail(job_id, request_id, err, retention_s)
            raise
        except Exception as exc:  # the route's error body; a bug is 'internal' and logged (classify)
            await self._fail(job_id, request_id, classify(exc, request_id), retention_s)
        else:
            await self.store.finish.remote(job_id, result, retention_s)

    async def _fail(self, job_id: str, request_id: str, err: LipserveError, retention_s: float) -> None:
        await self.store.fail.remote(job_id, err.to_dict(request_id)["error"], err.status, retention_s)

    async def _report_in(self, every_s: float) -> None:
        """Tell the book this replica still works on its jobs, until it has none."""
        while self.tasks:
            await asyncio.sleep(every_s)
            if not self.tasks:
                break
            try:
                await self.store.touch.remote(list(self.tasks))
            except ray.exceptions.RayError as exc:  # the store is restarting; the next round retries
                log.warning("job store unreachable (%s); retrying in %.1fs", type(exc).__name__, every_s)

    async def drain(self, timeout_s: float) -> int:
        """Let running jobs finish for up to timeout_s, then cancel the rest (their book entry says
        job_interrupted). Returns how many were cancelled."""
        pending = list(self.tasks.values())
        if not pending:
            return 0
        t = time.monotonic()
        done, still = await asyncio.wait(pending, timeout=timeout_s)
        for task in still:
            task.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)
        log.info("drained %d job(s) in %.1fs, interrupted %d", len(done), time.monotonic() - t, len(still))
        return len(still)
