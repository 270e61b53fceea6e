"""The job book's rules (lipserve.jobs), on a fake clock, no Ray."""
from __future__ import annotations

from lipserve.contract import JobStatus
from lipserve.jobs import JobBook

RESULT = {"request_id": "rid", "output_video_gs": "out.mp4", "duration_s": 1.0, "engines": {}, "step_times": {"total": 9.0},
          "synthetic_weights": True}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def book_and_clock():
    clock = Clock()
    return JobBook(clock), clock


def test_a_job_goes_queued_running_done_and_is_forgotten_after_retention():
    book, clock = book_and_clock()
    created = book.create("j1", "rid", owner="replica-a")
    assert created["status"] == "queued" and "owner" not in created
    book.stage("j1", "download", "start")
    book.stage("j1", "download", "end", 0.1)
    book.stage("j1", "tts", "start")
    book.stage("j1", "faces", "start")
    book.stage("j1", "faces", "end", 0.5)
    status = book.get("j1", lost_after_s=30, retention_s=60)
    assert status["status"] == "running" and status["stage"] == "tts"
    assert status["stages"]["download"] == {"state": "done", "seconds": 0.1}
    assert status["stages"]["tts"]["state"] == "running"
    clock.now += 5
    book.finish("j1", RESULT, retention_s=60)
    done = book.get("j1", lost_after_s=30, retention_s=60)
    assert done["status"] == "done" and done["result"] == RESULT and done["stage"] is None
    assert done["expires_at"] == clock.now + 60
    JobStatus.model_validate(done)  # the book's dicts are the contract's JobStatus
    clock.now += 59
    assert book.get("j1", 30, 60) is not None
    clock.now += 2
    assert book.get("j1", 30, 60) is None and book.counts()["done"] == 0


def test_a_failed_job_keeps_the_error_body_and_status_and_stops_its_stages():
    book, _ = book_and_clock()
    book.create("j2", "rid", owner="a")
    book.stage("j2", "voice", "start")
    error = {"code": "no_voice_found", "message": "no voice", "request_id": "rid"}
    book.fail("j2", error, 422, retention_s=60)
    status = book.get("j2", 30, 60)
    assert (status["status"], status["error"], status["http_status"]) == ("failed", error, 422)
    assert status["stages"]["voice"]["state"] == "stopped"
    JobStatus.model_validate(status)


def test_a_job_whose_replica_stops_reporting_fails_as_interrupted():
    book, clock = book_and_clock()
    book.create("alive", "r1", owner="a")
    book.create("lost", "r2", owner="b")
    book.stage("lost", "tts", "start")
    for _ in range(4):  # replica a reports in; replica b is gone
        clock.now += 10
        book.touch(["alive"])
    assert book.get("alive", lost_after_s=30, retention_s=60)["status"] == "queued"
    lost = book.get("lost", lost_after_s=30, retention_s=60)
    assert lost["status"] == "failed" and lost["http_status"] == 503
    assert lost["error"]["code"] == "job_interrupted" and lost["error"]["request_id"] == "r2"
    # the first word stays: a late finish from a replica thought dead does not undo it
    book.finish("lost", RESULT, retention_s=60)
    assert book.get("lost", 30, 60)["status"] == "failed"


def test_a_lost_job_nobody_asks_about_still_ends_and_expires():
    book, clock = book_and_clock()
    book.create("forgotten", "r1", owner="gone")
    clock.now += 31
    assert book.get("other", lost_after_s=30, retention_s=60) is None  # any read settles the book
    assert book.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 1}
    clock.now += 61
    book.get("other", 30, 60)
    assert book.jobs == {}


def test_unknown_jobs_are_none_and_reports_about_them_are_ignored():
    book, _ = book_and_clock()
    assert book.get("nope", 30, 60) is None
    book.stage("nope", "tts", "start")
    book.touch(["nope"])
    book.finish("nope", RESULT, 60)
    assert book.jobs == {}
