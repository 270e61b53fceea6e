"""A client for lipserve's HTTP API, synchronous and asynchronous (httpx).

    from lipserve.client import LipserveClient
    with LipserveClient("http://127.0.0.1:8000", token="...") as client:
        answer = client.lip_video("Hello there.", "gs://bucket/me.mp4", "gs://bucket/me-says.mp4")
        job = client.submit_job("A longer sentence ...", "gs://bucket/me.mp4", "gs://bucket/me-long.mp4")
        answer = client.wait_job(job.job_id)            # polls GET /api/v1/jobs/{id}

`AsyncLipserveClient` has the same methods, awaitable. Requests are built with the server's own
models (lipserve.contract), so a bad field fails here, before anything is sent; answers are
parsed into the same models. A failure the server answers raises `LipserveHTTPError` with its
status, `code`, message and request id.

Retries (`RetryPolicy`), chosen so that retrying is never what makes a request go wrong:

* 503 (overloaded, a stage not ready) is retried after the server's `Retry-After`, exactly; when
  the server sends none, after an exponential backoff. A server asking for a longer wait than
  `max_delay_s` is taken at its word: the client gives up rather than come back early.
* A connection that could not be made (refused, connect timeout) is retried the same way: the
  request never reached the server.
* A 4xx is never retried: the request itself is wrong (or the output exists), and sending it
  again cannot help. Other 5xx are not retried unless listed in `retry_statuses`.
* A read timeout is retried only for GETs: a POST may still be running on the server (that is
  what jobs are for).
* The budget: at most `max_attempts` attempts and at most `budget_s` seconds of waiting in all;
  when the next wait would pass either, the last error is raised.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from .contract import JobStatus, LipVideoRequest, LipVideoResponse, RequestOptions, UploadResult

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a synchronous request may take minutes on a CPU


class LipserveHTTPError(Exception):
    """The server answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None,
                 retry_after: float | None = None, attempts: int = 1):
        super().__init__(f"{status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.code, self.message = status, code, message
        self.request_id, self.retry_after, self.attempts = request_id, retry_after, attempts

    @classmethod
    def from_response(cls, response: httpx.Response, attempts: int = 1) -> "LipserveHTTPError":
        code, message, request_id = f"http_{response.status_code}", response.text[:500], None
        try:
            error = response.json()["error"]
            code, message, request_id = error["code"], error["message"], error.get("request_id")
        except (ValueError, KeyError, TypeError):  # not our JSON body (e.g. a proxy's plain-text 503)
            pass
        return cls(response.status_code, code, message, request_id or response.headers.get("x-request-id"),
                   retry_after_seconds(response.headers.get("retry-after")), attempts)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class RetryPolicy:
    max_attempts: int = 5
    budget_s: float = 120.0        # seconds of waiting between attempts, in all
    max_delay_s: float = 60.0      # the longest single wait the client accepts
    backoff_s: float = 0.5         # first wait when the server names none; doubles each time
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({503}))

    def delay(self, attempt: int, waited: float, *, status: int | None = None, retry_after: float | None = None,
              error: Exception | None = None, idempotent: bool = False) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if attempt >= self.max_attempts:
            return None
        if status is not None:
            if status < 500 or status not in self.retry_statuses:
                return None
        elif not (isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
                  or (idempotent and isinstance(error, (httpx.ReadTimeout, httpx.RemoteProtocolError)))):
            return None
        if retry_after is not None:
            wait = retry_after
        else:  # jitter spreads the callers a restart refused all at once
            wait = self.backoff_s * (2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
        if wait > self.max_delay_s or waited + wait > self.budget_s:
            return None
        return wait


def build_request(word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                  options: RequestOptions | dict | None = None) -> dict:
    """The JSON body, validated with the server's model (a bad field raises pydantic's error here)."""
    request = LipVideoRequest(word=word, user_video_gs=user_video_gs, output_video_gs=output_video_gs,
                              tts_lang=tts_lang, options=RequestOptions.model_validate(options or {}))
    # only what the caller set: the server's defaults (settings) apply to the rest
    return request.model_dump(mode="json", exclude_unset=True)


def _job_outcome(status: JobStatus) -> LipVideoResponse:
    if status.status == "done":
        return status.result
    err = status.error
    raise LipserveHTTPError(status.http_status or 500, err.code, err.message, err.request_id)


class _Base:
    def __init__(self, url: str, token: str | None, retry: RetryPolicy | None):
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _plan(self, attempt: int, waited: float, method: str, response: httpx.Response | None = None,
              error: Exception | None = None) -> float | None:
        if response is not None:
            return self.retry.delay(attempt, waited, status=response.status_code,
                                    retry_after=retry_after_seconds(response.headers.get("retry-after")))
        return self.retry.delay(attempt, waited, error=error, idempotent=method == "GET")

    @staticmethod
    def _unreachable(exc: Exception, attempts: int) -> LipserveHTTPError:
        return LipserveHTTPError(0, "unreachable", f"{type(exc).__name__}: {exc}", attempts=attempts)


class LipserveClient(_Base):
    """Synchronous client. `sleep` is how it waits between attempts (tests pass a recorder)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, retry)
        self.sleep = sleep
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers, transport=transport)

    def __enter__(self) -> "LipserveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with the retry policy; raises LipserveHTTPError on a final failure."""
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                delay = self._plan(attempt, waited, method, error=exc)
                if delay is None:
                    raise self._unreachable(exc, attempt) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._plan(attempt, waited, method, response=response)
                if delay is None:
                    raise LipserveHTTPError.from_response(response, attempt)
            self.sleep(delay)
            waited += delay

    def lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                  options: RequestOptions | dict | None = None, *, request_id: str | None = None) -> LipVideoResponse:
        """POST /api/v1/lip-video: the video, written to output_video_gs, when the call returns."""
        body = build_request(word, user_video_gs, output_video_gs, tts_lang, options)
        headers = {"X-Request-ID": request_id} if request_id else {}
        return LipVideoResponse.model_validate(self.send("POST", "/api/v1/lip-video", json=body, headers=headers).json())

    def submit_job(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                   options: RequestOptions | dict | None = None, *, request_id: str | None = None) -> JobStatus:
        """POST /api/v1/jobs: the same request, accepted at once (202)."""
        body = build_request(word, user_video_gs, output_video_gs, tts_lang, options)
        headers = {"X-Request-ID": request_id} if request_id else {}
        return JobStatus.model_validate(self.send("POST", "/api/v1/jobs", json=body, headers=headers).json())

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self.send("GET", f"/api/v1/jobs/{job_id}").json())

    def wait_job(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                 on_status: Callable[[JobStatus], None] | None = None) -> LipVideoResponse:
        """Poll until the job is done (its response) or failed (its error, raised)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.job(job_id)
            if on_status is not None:
                on_status(status)
            if status.status in ("done", "failed"):
                return _job_outcome(status)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s:g} s")
            self.sleep(poll_s)

    def upload(self, path: str | Path) -> UploadResult:
        """POST /api/v1/uploads: a local video into the server's storage root (use `.uri` as the source)."""
        path = Path(path)
        response = self.send("POST", "/api/v1/uploads", content=path.read_bytes(),
                             headers={"Content-Type": "application/octet-stream", "X-Filename": path.name})
        return UploadResult.model_validate(response.json())

    def health(self) -> dict:
        return self.send("GET", "/health").json()

    def languages(self) -> dict:
        return self.send("GET", "/api/v1/languages").json()


class AsyncLipserveClient(_Base):
    """The same client for asyncio."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, token, retry)
        self.sleep = sleep
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=self.headers, transport=transport)

    async def __aenter__(self) -> "AsyncLipserveClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                delay = self._plan(attempt, waited, method, error=exc)
                if delay is None:
                    raise self._unreachable(exc, attempt) from exc
            else:
                if response.status_code < 400:
                    return response
                delay = self._plan(attempt, waited, method, response=response)
                if delay is None:
                    raise LipserveHTTPError.from_response(response, attempt)
            await self.sleep(delay)
            waited += delay

    async def lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                        options: RequestOptions | dict | None = None, *,
                        request_id: str | None = None) -> LipVideoResponse:
        body = build_request(word, user_video_gs, output_video_gs, tts_lang, options)
        headers = {"X-Request-ID": request_id} if request_id else {}
        response = await self.send("POST", "/api/v1/lip-video", json=body, headers=headers)
        return LipVideoResponse.model_validate(response.json())

    async def submit_job(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                         options: RequestOptions | dict | None = None, *,
                         request_id: str | None = None) -> JobStatus:
        body = build_request(word, user_video_gs, output_video_gs, tts_lang, options)
        headers = {"X-Request-ID": request_id} if request_id else {}
        return JobStatus.model_validate((await self.send("POST", "/api/v1/jobs", json=body, headers=headers)).json())

    async def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate((await self.send("GET", f"/api/v1/jobs/{job_id}")).json())

    async def wait_job(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                       on_status: Callable[[JobStatus], None] | None = None) -> LipVideoResponse:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = await self.job(job_id)
            if on_status is not None:
                on_status(status)
            if status.status in ("done", "failed"):
                return _job_outcome(status)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s:g} s")
            await self.sleep(poll_s)

    async def upload(self, path: str | Path) -> UploadResult:
        path = Path(path)
        response = await self.send("POST", "/api/v1/uploads", content=path.read_bytes(),
                                   headers={"Content-Type": "application/octet-stream", "X-Filename": path.name})
        return UploadResult.model_validate(response.json())

    async def health(self) -> dict:
        return (await self.send("GET", "/health")).json()

    async def languages(self) -> dict:
        return (await self.send("GET", "/api/v1/languages")).json()
