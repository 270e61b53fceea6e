"""lipserve.client's retry policy against a small real HTTP server on 127.0.0.1 (no Ray).

The server answers from a script per request and records what it got; the clients are given a
sleep that records the waits instead of sleeping (one test lets the real sleep run, to show the
default waits for real)."""
from __future__ import annotations

import asyncio
import json
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler

import pytest

from lipserve.client import (
    AsyncLipserveClient,
    LipserveClient,
    LipserveHTTPError,
    RetryPolicy,
    retry_after_seconds,
)
from tests.fixtures.ray import free_port
from tests.fixtures.http_files import ThreadServer

RESULT = {"request_id": "r1", "output_video_gs": "gs://b/out.mp4", "duration_s": 1.5, "engines": {"tts": "piper"},
          "step_times": {"total": 2.0}, "synthetic_weights": True}
ARGS = ("Hello there.", "gs://b/in.mp4", "gs://b/out.mp4")


def error(status: int, code: str, retry_after: str | None = None) -> tuple:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return status, {"error": {"code": code, "message": f"{code} message", "request_id": "rid"}}, headers


class ScriptedServer(ThreadServer):
    """Answers each request with the next scripted (status, body, headers); the last one repeats."""

    def __init__(self, script: list[tuple]):
        self.script, self.hits = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                server.hits.append({"t": time.monotonic(), "method": self.command, "path": self.path,
                                    "headers": dict(self.headers), "body": body})
                status, payload, headers = server.script[min(len(server.hits), len(server.script)) - 1]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):  # keep the test output clean
                pass

        super().__init__(Handler)


def client_for(server, waits: list, **policy) -> LipserveClient:
    return LipserveClient(server.url, token="tok", timeout=5, retry=RetryPolicy(**policy), sleep=waits.append)


def test_503_is_retried_after_exactly_the_servers_retry_after():
    waits = []
    with ScriptedServer([error(503, "overloaded", "2"), error(503, "model_not_loaded", "3"), (200, RESULT, {})]) as server:
        with client_for(server, waits) as client:
            answer = client.lip_video(*ARGS, options={"face_mode": "track"})
    assert waits == [2.0, 3.0]
    assert len(server.hits) == 3 and answer.output_video_gs == "gs://b/out.mp4" and answer.synthetic_weights
    first = server.hits[0]
    assert first["method"] == "POST" and first["path"] == "/api/v1/lip-video"
    assert first["headers"]["Authorization"] == "Bearer tok"
    # only what the caller set goes over the wire: the server's settings decide the rest
    assert json.loads(first["body"]) == {"word": ARGS[0], "user_video_gs": ARGS[1], "output_video_gs": ARGS[2],
                                         "tts_lang": "en", "options": {"face_mode": "track"}}


def test_gives_up_when_the_next_wait_would_pass_the_budget():
    waits = []
    with ScriptedServer([error(503, "overloaded", "10")]) as server:
        with client_for(server, waits, budget_s=25, max_attempts=10) as client:
            with pytest.raises(LipserveHTTPError) as info:
                client.lip_video(*ARGS)
    assert waits == [10.0, 10.0]  # a third wait would make 30 s > 25 s
    assert len(server.hits) == 3
    err = info.value
    assert (err.status, err.code, err.attempts, err.retry_after, err.request_id) == (503, "overloaded", 3, 10.0, "rid")


def test_gives_up_after_max_attempts_with_backoff_when_no_retry_after():
    waits = []
    with ScriptedServer([(503, "no healthy replicas", {})]) as server:  # a proxy's plain-text 503
        with client_for(server, waits, max_attempts=3, backoff_s=0.5) as client:
            with pytest.raises(LipserveHTTPError) as info:
                client.lip_video(*ARGS)
    assert len(server.hits) == 3 and len(waits) == 2
    assert 0.4 <= waits[0] <= 0.6 and 0.8 <= waits[1] <= 1.2  # 0.5 s, then doubled, each +-20 %
    assert info.value.code == "http_503" and "no healthy replicas" in info.value.message


def test_a_server_asking_for_more_than_max_delay_is_not_called_back_early():
    waits = []
    with ScriptedServer([error(503, "weights_missing", "60")]) as server:
        with client_for(server, waits, max_delay_s=30) as client:
            with pytest.raises(LipserveHTTPError):
                client.lip_video(*ARGS)
    assert waits == [] and len(server.hits) == 1


@pytest.mark.parametrize("status, code", [(400, "invalid_field"), (401, "unauthorized"), (404, "source_not_found"),
                                          (409, "output_exists"), (413, "input_too_large"), (422, "no_face_found"),
                                          (429, "too_many")])
def test_a_4xx_is_never_retried(status, code):
    waits = []
    with ScriptedServer([error(status, code, "1"), (200, RESULT, {})]) as server:
        with client_for(server, waits) as client:
            with pytest.raises(LipserveHTTPError) as info:
                client.lip_video(*ARGS)
    assert len(server.hits) == 1 and waits == []
    assert info.value.status == status and info.value.code == code


def test_other_5xx_are_retried_only_when_listed():
    waits = []
    script = [error(502, "storage_unavailable", "1"), (200, RESULT, {})]
    with ScriptedServer(script) as server:
        with client_for(server, waits) as client:
            with pytest.raises(LipserveHTTPError):
                client.lip_video(*ARGS)
        assert len(server.hits) == 1 and waits == []
    with ScriptedServer(script) as server:
        with client_for(server, waits, retry_statuses=frozenset({502, 503})) as client:
            assert client.lip_video(*ARGS).request_id == "r1"
        assert len(server.hits) == 2 and waits == [1.0]


def test_connection_refused_is_retried_then_reported():
    waits = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with LipserveClient(url, retry=RetryPolicy(max_attempts=3, backoff_s=0.1), sleep=waits.append) as client:
        with pytest.raises(LipserveHTTPError) as info:
            client.health()
    assert len(waits) == 2 and info.value.status == 0 and info.value.code == "unreachable"
    assert info.value.attempts == 3


def test_the_default_sleep_really_waits_retry_after():
    with ScriptedServer([error(503, "overloaded", "1"), (200, RESULT, {})]) as server:
        with LipserveClient(server.url, timeout=5) as client:
            client.lip_video(*ARGS)
    assert len(server.hits) == 2
    assert server.hits[1]["t"] - server.hits[0]["t"] >= 1.0


def test_async_client_follows_the_same_policy():
    waits = []

    async def record(seconds):
        waits.append(seconds)

    async def scenario(url):
        async with AsyncLipserveClient(url, token="tok", timeout=5, sleep=record) as client:
            answer = await client.lip_video(*ARGS)
            with pytest.raises(LipserveHTTPError) as info:
                await client.lip_video(*ARGS)
            return answer, info.value

    script = [error(503, "overloaded", "2"), (200, RESULT, {}), error(409, "output_exists")]
    with ScriptedServer(script) as server:
        answer, err = asyncio.run(scenario(server.url))
    assert answer.request_id == "r1" and waits == [2.0]
    assert err.status == 409 and len(server.hits) == 3


def test_wait_job_returns_the_result_or_raises_the_jobs_error():
    queued = {"job_id": "j1", "status": "running", "stage": "tts", "stages": {"tts": {"state": "running"}},
              "created_at": 1.0, "updated_at": 2.0}
    done = {**queued, "status": "done", "stage": None, "result": RESULT}
    failed = {**queued, "status": "failed", "stage": None, "http_status": 422,
              "error": {"code": "no_face_found", "message": "no face", "request_id": "rid"}}
    waits, seen = [], []
    with ScriptedServer([(200, queued, {}), (200, done, {})]) as server:
        with client_for(server, waits) as client:
            assert client.wait_job("j1", poll_s=0.25, on_status=lambda s: seen.append(s.status)).request_id == "r1"
    assert seen == ["running", "done"] and waits == [0.25]
    assert server.hits[0]["path"] == "/api/v1/jobs/j1"
    with ScriptedServer([(200, failed, {})]) as server:
        with client_for(server, waits) as client:
            with pytest.raises(LipserveHTTPError) as info:
                client.wait_job("j1")
    assert (info.value.status, info.value.code) == (422, "no_face_found")


def test_retry_after_as_seconds_or_http_date():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert 29 <= retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) <= 31


def test_a_bad_field_fails_in_the_client_before_anything_is_sent():
    waits = []
    with ScriptedServer([(200, RESULT, {})]) as server:
        with client_for(server, waits) as client:
            with pytest.raises(ValueError, match="resize_factor"):
                client.lip_video(*ARGS, options={"resize_factor": 0})
    assert server.hits == []


def test_lipserve_call_job_mode_prints_each_stage_and_the_result(capsys):
    from lipserve.cli import main

    base = {"job_id": "j9", "created_at": 1.0, "updated_at": 2.0}
    script = [(202, {**base, "status": "queued"}, {}),
              (200, {**base, "status": "running", "stage": "tts", "stages": {"tts": {"state": "running"}}}, {}),
              (200, {**base, "status": "done", "result": RESULT,
                     "stages": {"tts": {"state": "done", "seconds": 1.25}, "lipsync": {"state": "done", "seconds": 3.5}}}, {})]
    with ScriptedServer(script) as server:
        code = main(["call", "--url", server.url, "--video", "gs://b/in.mp4", "--text", "Hi there.", "--job",
                     "--poll", "0", "--token", "t0k"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [h["path"] for h in server.hits] == ["/api/v1/jobs", "/api/v1/jobs/j9", "/api/v1/jobs/j9"]
    sent = json.loads(server.hits[0]["body"])
    assert sent["output_video_gs"].startswith("gs://b/in-said-") and server.hits[0]["headers"]["Authorization"] == "Bearer t0k"
    assert "job j9 accepted" in err and "tts       running" in err and "tts       done in 1.25s" in err
    assert "lipsync   done in 3.50s" in err and "SYNTHETIC" in err
    assert "wrote gs://b/out.mp4 (1.50s)" in out
