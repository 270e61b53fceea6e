"""A client for lipserve's HTTP API, synchronous and asynchronous (httpx).

    from lipserve.client import LipserveClient
    with LipserveClient("http://127.0.0.1:8000", token="...") as client:
        answer = client.lip_video("Hello there.", "gs://bucket/me.mp4", "gs://bucket/me-says.mp4")
        job = client.submit_job("A longer sentence ...", "gs://bucket/me.mp4", "gs://bucket/me-long.mp4")
        answer = client.wait_job(job.job_id)            # polls GET /api/v1/jobs/{id}
        with client.stream_lip_video("Hello there.", "gs://bucket/me.mp4", "gs://bucket/me-said.mp4") as answer:
            for chunk in answer.chunks():              # fragmented MP4, as it is made
                ...                                    # IncompleteAnswer if the server aborts it

`AsyncLipserveClient` has the same methods, awaitable. Both build every call with one `Call`
builder and retry it with one `RetryPolicy` (tenacity's `Retrying` or `AsyncRetrying`); only the
send itself differs. Requests are built with the server's own models (lipserve.contract), so a
bad field fails here, before anything is sent; answers are parsed into the same models. A failure
the server answers raises `LipserveHTTPError` with its status, `code`, message and request id.

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
* A streamed answer (`stream_lip_video`) follows the same rules until its status line; once its
  body has begun nothing is sent again, and a body that ends early raises `IncompleteAnswer`.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Iterator, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception_type, retry_if_result

from .contract import JobStatus, LipVideoRequest, LipVideoResponse, RequestOptions, UploadResult

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a synchronous request may take minutes on a CPU

T = TypeVar("T")


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


class IncompleteAnswer(Exception):
    """A streamed answer that ended before its last chunk: the server aborted it after the first byte
    (its failure is in the server's log under the request id), or the connection broke."""

    def __init__(self, received: int, request_id: str | None, cause: BaseException):
        super().__init__(f"the answer is incomplete: the stream ended after {received} bytes without its end "
                         f"({type(cause).__name__}: {cause})" + (f" (request {request_id})" if request_id else ""))
        self.received, self.request_id = received, request_id


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


def _failed(response: httpx.Response) -> bool:
    return response.status_code >= 400


def _raise_final_error(state: RetryCallState) -> None:
    """The error the last attempt ended with: the server's answer, or why it could not be reached."""
    if state.outcome.failed:
        exc = state.outcome.exception()
        message = f"{type(exc).__name__}: {exc}"
        raise LipserveHTTPError(0, "unreachable", message, attempts=state.attempt_number) from exc
    raise LipserveHTTPError.from_response(state.outcome.result(), state.attempt_number)


@dataclass
class RetryPolicy:
    """When to send a call again and how long to wait first; `retrying` makes it tenacity's."""

    max_attempts: int = 5
    budget_s: float = 120.0        # seconds of waiting between attempts, in all
    max_delay_s: float = 60.0      # the longest single wait the client accepts
    backoff_s: float = 0.5         # first wait when the server names none; doubles each time
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({503}))

    def retryable(self, state: RetryCallState, idempotent: bool) -> bool:
        """Whether sending again can help: a listed 5xx, a connection never made, a GET's read timeout."""
        if not state.outcome.failed:
            status = state.outcome.result().status_code
            return status >= 500 and status in self.retry_statuses
        error = state.outcome.exception()
        return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)) or (
            idempotent and isinstance(error, (httpx.ReadTimeout, httpx.RemoteProtocolError)))

    def wait(self, state: RetryCallState) -> float:
        """The server's Retry-After when it names one, else the backoff for this attempt."""
        if not state.outcome.failed:
            retry_after = retry_after_seconds(state.outcome.result().headers.get("retry-after"))
            if retry_after is not None:
                return retry_after
        # jitter spreads the callers a restart refused all at once
        return self.backoff_s * (2 ** (state.attempt_number - 1)) * random.uniform(0.8, 1.2)

    def gives_up(self, state: RetryCallState, idempotent: bool) -> bool:
        """After this attempt: out of attempts, not worth retrying, or the next wait is too long."""
        wait = state.upcoming_sleep
        return (state.attempt_number >= self.max_attempts or not self.retryable(state, idempotent)
                or wait > self.max_delay_s or state.idle_for + wait > self.budget_s)

    def retrying(self, kind: type[Retrying] | type[AsyncRetrying], sleep: Callable, *,
                 idempotent: bool) -> Retrying | AsyncRetrying:
        """A tenacity controller for one call; every failed attempt goes to `gives_up`, so the final
        one always ends as a LipserveHTTPError counting the attempts."""
        return kind(sleep=sleep, wait=self.wait, stop=lambda state: self.gives_up(state, idempotent),
                    retry=retry_if_exception_type(httpx.TransportError) | retry_if_result(_failed),
                    retry_error_callback=_raise_final_error)


def build_request(word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                  options: RequestOptions | dict | None = None) -> dict:
    """The JSON body, validated with the server's model (a bad field raises pydantic's error here)."""
    request = LipVideoRequest(word=word, user_video_gs=user_video_gs, output_video_gs=output_video_gs,
                              tts_lang=tts_lang, options=RequestOptions.model_validate(options or {}))
    # only what the caller set: the server's defaults (settings) apply to the rest
    return request.model_dump(mode="json", exclude_unset=True)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what goes over the wire (httpx's request keywords) and how the answer becomes a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    keywords: dict = field(default_factory=dict)


def _json(response: httpx.Response) -> dict:
    return response.json()


def _model(model: type[T]) -> Callable[[httpx.Response], T]:
    return lambda response: model.model_validate(response.json())


class StreamedAnswer:
    """An open 200 from POST /api/v1/lip-video/stream: the video's bytes as the server sends them.

    `chunks()` (or `achunks()` on the asynchronous client) yields them; a transfer that ends before
    the body's end raises IncompleteAnswer, so a caller never mistakes a cut-off file for the answer."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.request_id = response.headers.get("x-request-id")
        self.received = 0

    def _incomplete(self, cause: BaseException) -> IncompleteAnswer:
        return IncompleteAnswer(self.received, self.request_id, cause)

    def chunks(self) -> Iterator[bytes]:
        try:
            for chunk in self.response.iter_bytes():
                self.received += len(chunk)
                yield chunk
        except httpx.TransportError as exc:  # incomplete chunked body, reset, read timeout
            raise self._incomplete(exc) from exc

    async def achunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_bytes():
                self.received += len(chunk)
                yield chunk
        except httpx.TransportError as exc:
            raise self._incomplete(exc) from exc


class Calls:
    """Every call of the API, built once for both clients."""

    @staticmethod
    def _video(path: str, parse: Callable[[httpx.Response], T], word: str, user_video_gs: str,
               output_video_gs: str, tts_lang: str, options: RequestOptions | dict | None,
               request_id: str | None) -> Call[T]:
        body = build_request(word, user_video_gs, output_video_gs, tts_lang, options)
        headers = {"X-Request-ID": request_id} if request_id else {}
        return Call("POST", path, parse, {"json": body, "headers": headers})

    @classmethod
    def lip_video(cls, *request: Any) -> Call[LipVideoResponse]:
        return cls._video("/api/v1/lip-video", _model(LipVideoResponse), *request)

    @classmethod
    def lip_video_stream(cls, *request: Any) -> Call[StreamedAnswer]:
        return cls._video("/api/v1/lip-video/stream", StreamedAnswer, *request)

    @classmethod
    def submit_job(cls, *request: Any) -> Call[JobStatus]:
        return cls._video("/api/v1/jobs", _model(JobStatus), *request)

    @staticmethod
    def job(job_id: str) -> Call[JobStatus]:
        return Call("GET", f"/api/v1/jobs/{job_id}", _model(JobStatus))

    @staticmethod
    def upload(path: str | Path) -> Call[UploadResult]:
        path = Path(path)
        headers = {"Content-Type": "application/octet-stream", "X-Filename": path.name}
        return Call("POST", "/api/v1/uploads", _model(UploadResult), {"content": path.read_bytes(), "headers": headers})

    @staticmethod
    def health() -> Call[dict]:
        return Call("GET", "/health", _json)

    @staticmethod
    def languages() -> Call[dict]:
        return Call("GET", "/api/v1/languages", _json)


class _JobWatch:
    """What wait_job decides on each status it polls: the result, the job's error, a timeout, or poll again."""

    def __init__(self, job_id: str, timeout_s: float | None, on_status: Callable[[JobStatus], None] | None):
        self.job_id, self.timeout_s, self.on_status = job_id, timeout_s, on_status
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def outcome(self, status: JobStatus) -> LipVideoResponse | None:
        """The response of a finished job (a failed one's error raised), or None to poll again."""
        if self.on_status is not None:
            self.on_status(status)
        if status.status == "done":
            return status.result
        if status.status == "failed":
            err = status.error
            raise LipserveHTTPError(status.http_status or 500, err.code, err.message, err.request_id)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"job {self.job_id} still {status.status} after {self.timeout_s:g} s")
        return None


class _ClientBase:
    """What both clients share: the address, the bearer token, timeouts, the calls and the retry policy."""

    def __init__(self, url: str, token: str | None, retry: RetryPolicy | None, sleep: Callable,
                 timeout: float | httpx.Timeout, transport: Any):
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http_options = {"base_url": self.url, "timeout": timeout, "headers": self.headers,
                              "transport": transport}

    def _retrying(self, kind: type[Retrying] | type[AsyncRetrying], method: str) -> Retrying | AsyncRetrying:
        return self.retry.retrying(kind, self.sleep, idempotent=method == "GET")


class LipserveClient(_ClientBase):
    """Synchronous client. `sleep` is how it waits between attempts (tests pass a recorder)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, retry, sleep, timeout, transport)
        self.http = httpx.Client(**self._http_options)

    def __enter__(self) -> "LipserveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with the retry policy; raises LipserveHTTPError on a final failure."""
        return self._retrying(Retrying, method)(self.http.request, method, path, **kwargs)

    def _run(self, call: Call[T]) -> T:
        return call.parse(self.send(call.method, call.path, **call.keywords))

    def _open_stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One attempt of a streamed call: the response open on its body, or a refusal read whole."""
        response = self.http.send(self.http.build_request(method, path, **kwargs), stream=True)
        if _failed(response):
            try:
                response.read()  # the JSON error body: the retry policy and LipserveHTTPError read it
            finally:
                response.close()
        return response

    def lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                  options: RequestOptions | dict | None = None, *, request_id: str | None = None) -> LipVideoResponse:
        """POST /api/v1/lip-video: the video, written to output_video_gs, when the call returns."""
        return self._run(Calls.lip_video(word, user_video_gs, output_video_gs, tts_lang, options, request_id))

    @contextmanager
    def stream_lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                         options: RequestOptions | dict | None = None, *,
                         request_id: str | None = None) -> Iterator[StreamedAnswer]:
        """POST /api/v1/lip-video/stream: the video's bytes as they are made (docs/SERVING.md). A
        refusal before the first byte raises LipserveHTTPError (503 retried as on every call)."""
        call = Calls.lip_video_stream(word, user_video_gs, output_video_gs, tts_lang, options, request_id)
        response = self._retrying(Retrying, call.method)(self._open_stream, call.method, call.path, **call.keywords)
        try:
            yield call.parse(response)
        finally:
            response.close()

    def submit_job(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                   options: RequestOptions | dict | None = None, *, request_id: str | None = None) -> JobStatus:
        """POST /api/v1/jobs: the same request, accepted at once (202)."""
        return self._run(Calls.submit_job(word, user_video_gs, output_video_gs, tts_lang, options, request_id))

    def job(self, job_id: str) -> JobStatus:
        return self._run(Calls.job(job_id))

    def wait_job(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                 on_status: Callable[[JobStatus], None] | None = None) -> LipVideoResponse:
        """Poll until the job is done (its response) or failed (its error, raised)."""
        watch = _JobWatch(job_id, timeout_s, on_status)
        while (answer := watch.outcome(self.job(job_id))) is None:
            self.sleep(poll_s)
        return answer

    def upload(self, path: str | Path) -> UploadResult:
        """POST /api/v1/uploads: a local video into the server's storage root (use `.uri` as the source)."""
        return self._run(Calls.upload(path))

    def health(self) -> dict:
        return self._run(Calls.health())

    def languages(self) -> dict:
        return self._run(Calls.languages())


class AsyncLipserveClient(_ClientBase):
    """The same client for asyncio."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, token, retry, sleep, timeout, transport)
        self.http = httpx.AsyncClient(**self._http_options)

    async def __aenter__(self) -> "AsyncLipserveClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._retrying(AsyncRetrying, method)(self.http.request, method, path, **kwargs)

    async def _run(self, call: Call[T]) -> T:
        return call.parse(await self.send(call.method, call.path, **call.keywords))

    async def _open_stream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.send(self.http.build_request(method, path, **kwargs), stream=True)
        if _failed(response):
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                        options: RequestOptions | dict | None = None, *,
                        request_id: str | None = None) -> LipVideoResponse:
        return await self._run(Calls.lip_video(word, user_video_gs, output_video_gs, tts_lang, options, request_id))

    @asynccontextmanager
    async def stream_lip_video(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                               options: RequestOptions | dict | None = None, *,
                               request_id: str | None = None) -> AsyncIterator[StreamedAnswer]:
        call = Calls.lip_video_stream(word, user_video_gs, output_video_gs, tts_lang, options, request_id)
        response = await self._retrying(AsyncRetrying, call.method)(self._open_stream, call.method, call.path,
                                                                    **call.keywords)
        try:
            yield call.parse(response)
        finally:
            await response.aclose()

    async def submit_job(self, word: str, user_video_gs: str, output_video_gs: str, tts_lang: str = "en",
                         options: RequestOptions | dict | None = None, *,
                         request_id: str | None = None) -> JobStatus:
        return await self._run(Calls.submit_job(word, user_video_gs, output_video_gs, tts_lang, options, request_id))

    async def job(self, job_id: str) -> JobStatus:
        return await self._run(Calls.job(job_id))

    async def wait_job(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                       on_status: Callable[[JobStatus], None] | None = None) -> LipVideoResponse:
        watch = _JobWatch(job_id, timeout_s, on_status)
        while (answer := watch.outcome(await self.job(job_id))) is None:
            await self.sleep(poll_s)
        return answer

    async def upload(self, path: str | Path) -> UploadResult:
        return await self._run(Calls.upload(path))

    async def health(self) -> dict:
        return await self._run(Calls.health())

    async def languages(self) -> dict:
        return await self._run(Calls.languages())
