"""The book of asynchronous jobs (POST /api/v1/jobs): their states, in one place, no Ray.

The serving graph keeps one JobBook inside a detached named Ray actor (deployments/jobs.py),
so every ingress replica reads and writes the same book and a job outlives the replica that
accepted it. The book itself is plain Python, so its rules are tested without Ray:

* queued -> running (with the stage that started last) -> done (the response body) or failed
  (the error body's `error` member and the status the synchronous route would have answered);
* the replica that runs a job reports in (`touch`) while the job is queued or running; a job
  whose replica has been silent for `lost_after_s` is failed with `job_interrupted` (503), so a
  replica that died never leaves a job 'running' forever;
* a finished job stays readable for `retention_s`, then is forgotten (404 `job_not_found`).

Every method takes and returns plain dicts (JobStatus fields), which cross Ray cheaply.
"""
from __future__ import annotations

import time
from typing import Callable

from .errors import JobInterrupted

ACTIVE = ("queued", "running")


class JobBook:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.jobs: dict[str, dict] = {}
        self.seen: dict[str, float] = {}  # job id -> when its replica last reported in

    # ------------------------------------------------------------ written by the replica running the job

    def create(self, job_id: str, request_id: str, owner: str) -> dict:
        now = self.clock()
        self.jobs[job_id] = {"job_id": job_id, "status": "queued", "stage": None, "stages": {},
                             "request_id": request_id, "owner": owner, "created_at": now, "updated_at": now,
                             "finished_at": None, "expires_at": None, "result": None, "error": None,
                             "http_status": None}
        self.seen[job_id] = now
        return self.public(self.jobs[job_id])

    def stage(self, job_id: str, stage: str, event: str, seconds: float | None = None) -> None:
        """A stage started ("start") or ended ("end", with its seconds); the job is running from its first stage."""
        job = self._active(job_id)
        if job is None:
            return
        job["status"] = "running"
        if event == "start":
            job["stages"][stage] = {"state": "running", "seconds": None}
            job["stage"] = stage
        else:
            job["stages"][stage] = {"state": "done", "seconds": seconds}
            running = [name for name, s in job["stages"].items() if s["state"] == "running"]
            job["stage"] = running[-1] if running else None
        job["updated_at"] = self.seen[job_id] = self.clock()

    def touch(self, job_ids: list[str]) -> None:
        """The running replica is alive and still working on these jobs."""
        now = self.clock()
        for job_id in job_ids:
            if job_id in self.jobs and self.jobs[job_id]["status"] in ACTIVE:
                self.seen[job_id] = now

    def finish(self, job_id: str, result: dict, retention_s: float) -> None:
        self._end(job_id, "done", retention_s, result=result)

    def fail(self, job_id: str, error: dict, http_status: int, retention_s: float) -> None:
        self._end(job_id, "failed", retention_s, error=error, http_status=http_status)

    # ------------------------------------------------------------ read by any replica

    def get(self, job_id: str, lost_after_s: float, retention_s: float) -> dict | None:
        """The job's state, or None if there is no such job (or it expired). Every read also fails
        the jobs whose replica went silent and forgets the expired ones, so a lost job nobody asks
        about still ends and goes."""
        self.fail_lost(lost_after_s, retention_s)
        self.sweep()
        job = self.jobs.get(job_id)
        return None if job is None else self.public(job)

    def fail_lost(self, lost_after_s: float, retention_s: float) -> list[str]:
        """Fail (job_interrupted, 503) the queued or running jobs not reported for lost_after_s."""
        now = self.clock()
        lost = [k for k, j in self.jobs.items()
                if j["status"] in ACTIVE and now - self.seen.get(k, j["created_at"]) > lost_after_s]
        for job_id in lost:
            err = JobInterrupted(f"the ingress replica running this job stopped reporting for more than "
                                 f"{lost_after_s:g} s (it was replaced or died); submit the job again")
            self._end(job_id, "failed", retention_s, error=err.to_dict(self.jobs[job_id]["request_id"])["error"],
                      http_status=err.status)
        return lost

    def sweep(self) -> int:
        """Forget finished jobs past their expiry; returns how many went."""
        now = self.clock()
        gone = [k for k, j in self.jobs.items() if j["expires_at"] is not None and j["expires_at"] <= now]
        for job_id in gone:
            del self.jobs[job_id]
            self.seen.pop(job_id, None)
        return len(gone)

    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
        for job in self.jobs.values():
            out[job["status"]] += 1
        return out

    # ------------------------------------------------------------ helpers

    @staticmethod
    def public(job: dict) -> dict:
        return {k: v for k, v in job.items() if k != "owner"}

    def _active(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job["status"] in ACTIVE else None

    def _end(self, job_id: str, status: str, retention_s: float, **fields) -> None:
        job = self._active(job_id)
        if job is None:  # already finished (e.g. failed as lost, then its replica answered late): first word stays
            return
        now = self.clock()
        job.update(fields, status=status, stage=None, updated_at=now, finished_at=now, expires_at=now + retention_s)
        for progress in job["stages"].values():
            if progress["state"] == "running":  # cut short by the failure
                progress["state"] = "stopped"
        self.seen.pop(job_id, None)
