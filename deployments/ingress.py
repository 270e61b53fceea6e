"""The HTTP front door (FastAPI under Ray Serve): the contract of DESIGN.md over the stage handles.

Per request: pre-flight (text, language, URIs, allow-list, output exists -> 409) before any heavy
work, fetch the source video once and put it in Ray's object store, then the same orchestration
as the one-process Pipeline (lipserve.pipeline.orchestrate) with the stages remote: the video
branch (face plan) runs beside the audio branch (TTS -> voice conversion), lip sync when both
are ready, the output written atomically last.

The routes take and return the models of lipserve/contract.py, so /openapi.json and /docs (served
from the package, no CDN) show every field and each error status with its codes; a body that
fails validation is answered with lipserve's own error body (400 invalid_field), never FastAPI's
422. Jobs (POST /api/v1/jobs) run the same work in the background (deployments/jobs.py); GET /
is a page to try it (lipserve/web).

Overload: Serve's proxy answers 503 + Retry-After once this deployment's max_queued_requests is
full (backpressure_config.retry_after_s). Inside, an admission gate bounds active and waiting
requests and answers our JSON 503 (`overloaded`, Retry-After) before that, and a stage's own
queue limit (BackPressureError) is answered the same way.

The edge (EdgeGuard, in front of every route): the bearer token on every route but /health and the
static pages (PUBLIC_PATHS), and the body-size limit, both decided before the body is read or parsed. A stage replica that dies
while it holds a request is answered 503 `stage_unavailable` naming the stage (Serve starts a new
one); error messages pass through `public_message` (no traceback, local path or credential).
"""
import asyncio
import collections
import hmac
import logging
import uuid
import os
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import Headers

from lipserve import web
from lipserve.contract import (
    EXAMPLE_REQUEST,
    JobStatus,
    LipVideoRequest,
    LipVideoResponse,
    UploadResult,
    error_responses,
    invalid_field,
)
from lipserve.errors import (
    BodyTooLarge,
    InputTooLarge,
    InternalError,
    InvalidField,
    JobNotFound,
    LipserveError,
    ModelNotLoaded,
    Overloaded,
    StageUnavailable,
    Unauthorized,
    Unavailable,
    public_message,
)
from lipserve.logs import configure_logging
from lipserve.pipeline import new_request_id, orchestrate, preflight, stage_engines, with_timeout
from lipserve.storage import Storage

from .common import apply_log_level, error_code, put_bytes, replica_settings
from .jobs import JobRunner, job_store
from .metrics import stage_metrics
from .webapp import app, read_at_most

log = logging.getLogger("lipserve.ingress")
# what the lip-video and job routes can answer besides success (each with its codes, in the schema)
REQUEST_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 500, 502, 503, 504)
EXAMPLE_BODY = Body(openapi_examples={"gcs": {"summary": "gs:// in, gs:// out", "value": EXAMPLE_REQUEST}})
# (an example given as openapi_examples, also because a plain `example` does not survive Serve's
# copy of the app: FastAPI's "unset" marker is compared by identity, and the copy prints it as {})
MEDIA_URI = Query(..., description="gs:// or storage-root path of a media file",
                  openapi_examples={"result": {"summary": "a result under the storage root",
                                               "value": "results/0123abcd.mp4"}})

STAGE_INFO_TIMEOUT_S = 15.0
# answered without the bearer token: /health (load balancers and probes have none), and the static
# pages a browser opens by address, which cannot carry a header: the try-it page (its calls carry
# the token typed into it), the API docs and the schema they load. None of them reads data or runs work.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/docs-assets/",)
# the one route whose body is a video, not JSON: held to max_input_bytes instead of max_body_bytes
UPLOAD_PATH = "/api/v1/uploads"


@dataclass
class Edge:
    """What the edge checks, from the ingress replica's settings (one ingress per process)."""

    token: str | None = None
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 200 * 1024 * 1024
    storage_root: str | None = None


edge = Edge()


def set_edge(token: str | None, max_body_bytes: int, storage_root: str, max_upload_bytes: int) -> None:
    """Point the edge at the ingress replica's settings. A function of this module on purpose:
    Serve ships the Ingress class to replicas by value, with copies of the globals its methods
    name, so `edge` written from a method would be a copy the guard never reads."""
    edge.token, edge.max_body_bytes, edge.storage_root = token, max_body_bytes, storage_root
    edge.max_upload_bytes = max_upload_bytes


def to_lipserve_error(exc: BaseException) -> "LipserveError | None":
    """Our named error for exc (also when it crossed a replica boundary), or None if unknown."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(exc, "cause", None)  # RayTaskError keeps the replica's exception here
    if isinstance(cause, LipserveError):
        return cause
    if isinstance(exc, LipserveError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("the service is at capacity; retry later")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return ModelNotLoaded(f"a stage is unavailable ({type(exc).__name__}); retry later")
    return None


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    err = to_lipserve_error(exc)
    if err is None:
        log.error("request %s failed", request_id, exc_info=exc)
        err = InternalError(f"internal error; quote request id {request_id}")
    elif err.status >= 500:
        log.warning("request %s: %s %s", request_id, err.code, err.message)
    headers = {}
    if err.status == 503:
        headers["Retry-After"] = str(int(err.retry_after or Unavailable.retry_after))
    body = err.to_dict(request_id)
    body["error"]["message"] = public_message(err.message, storage_root=edge.storage_root,
                                              secrets=(edge.token,) if edge.token else ())
    return JSONResponse(body, status_code=err.status, headers=headers)


def check_bearer(header: str, token: str | None) -> None:
    """Unauthorized (401) unless `header` is `Bearer <token>` (when a token is configured)."""
    if not token:
        return
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")


async def limit_body(headers: Headers, receive, limit: int, too_large: type[LipserveError] = BodyTooLarge,
                     what: str = "body"):
    """The ASGI `receive` the app gets, once the body is known to be at most `limit` bytes.

    A declared Content-Length over the limit is refused (`too_large`) without reading a byte; a
    body without one (chunked) is read up to the limit, then handed on from memory."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidField("Content-Length is not a number", field="body") from None
        if size > limit:
            raise too_large(f"the request {what} is {size} bytes; the limit is {limit}", field="body")
        return receive
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        return receive  # no body
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return receive  # the client went away; the app will see it
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise too_large(f"the request {what} is over the limit of {limit} bytes", field="body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body, replayed = b"".join(chunks), False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def without_secrets(user_config: dict) -> dict:
    settings = {k: v for k, v in (user_config.get("settings") or {}).items() if k != "auth_token"}
    return {**user_config, "settings": settings} if "settings" in user_config else dict(user_config)


def route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class EdgeGuard:
    """ASGI middleware in front of every route, FastAPI's own (/docs, /openapi.json) included:
    the bearer token and the body limit are decided before the app reads or parses the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            path = route_path(scope)
            if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                check_bearer(headers.get("authorization", ""), edge.token)
            if path == UPLOAD_PATH:  # a video: the source limit, and the route's own error
                receive = await limit_body(headers, receive, edge.max_upload_bytes, InputTooLarge, "upload")
            else:
                receive = await limit_body(headers, receive, edge.max_body_bytes, BodyTooLarge, "body")
        except LipserveError as exc:
            response = error_response(exc, new_request_id(headers.get("x-request-id")))
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


app.add_middleware(EdgeGuard)


def request_id_of(request: Request) -> str:
    """Serve's proxy puts X-Request-ID on every request (the caller's, or one it generates) and
    echoes it on the response; the error bodies and logs use the same id."""
    return request.headers.get("x-request-id") or new_request_id()


class AdmissionGate:
    """At most `active` requests run, at most `waiting` wait for a slot; the rest get 503 at once.

    `reserve()` takes the place synchronously (a job takes it when it is accepted, before its
    work starts); `async with` on the Admission waits for the slot, holds it, and gives it back."""

    def __init__(self, active: int, waiting: int):
        self.active, self.waiting_limit = max(1, int(active)), max(0, int(waiting))
        self.running = 0
        self._queue: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def reserve(self) -> "Admission":
        if self.running < self.active and not self._queue:
            self.running += 1
            return Admission(self, None)
        if len(self._queue) >= self.waiting_limit:
            raise Overloaded(f"{self.active} requests running and {self.waiting} waiting; retry later")
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        return Admission(self, turn)

    @asynccontextmanager
    async def slot(self):
        async with self.reserve():
            yield

    def _release(self) -> None:
        """A slot is free: hand it to the first still waiting, or give it back."""
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1


class Admission:
    """One request's place at the gate: a slot (held) or a place in the queue (waiting for one)."""

    def __init__(self, gate: AdmissionGate, turn: "asyncio.Future | None"):
        self.gate, self.turn = gate, turn
        self.held, self.closed = turn is None, False

    async def __aenter__(self) -> "Admission":
        if not self.held:
            try:
                await self.turn  # the releasing request hands its slot over
            except asyncio.CancelledError:
                self.close()
                raise
            self.held = True
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the place back, once: the slot if held (or handed over but never taken), else the queue place."""
        if self.closed:
            return
        self.closed = True
        if self.held or (self.turn is not None and self.turn.done() and not self.turn.cancelled()):
            self.gate._release()
        elif self.turn is not None:
            self.turn.cancel()
            if self.turn in self.gate._queue:
                self.gate._queue.remove(self.turn)


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


async def from_stage(deployment: str, step: str, response):
    """Await a stage call; a replica that died holding it becomes StageUnavailable (503)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    try:
        return await response
    except (RayActorError, DeploymentUnavailableError) as exc:
        raise StageUnavailable(f"the {deployment} replica running {step} stopped before answering "
                               f"({type(exc).__name__}); Serve is starting another, retry later",
                               stage=deployment) from exc


class RemoteStages:
    """lipserve.pipeline.Stages over Serve handles (see orchestrate)."""

    def __init__(self, ingress: "Ingress"):
        self.ingress = ingress

    def languages(self):
        return self.ingress.stage_languages

    def engines(self):
        return self.ingress.stage_engines

    async def read(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def share(self, data: bytes):
        return put_bytes(data)

    async def synthesize(self, text, language, engine, seed):
        return await from_stage("SpeechSynthesizer", "tts",
                                self.ingress.speech.synthesize.remote(text, language, engine, seed))

    async def convert(self, audio, sample_rate, reference, reference_is_video, deterministic, seed):
        return await from_stage("VoiceConverter", "voice", self.ingress.voice.convert.remote(
            audio, sample_rate, reference, reference_is_video, deterministic, seed))

    async def plan_faces(self, video, options, frames_needed):
        return await from_stage("LipSyncer", "faces", self.ingress.lipsync.plan_faces.remote(video, options, frames_needed))

    async def sync(self, video, audio, sample_rate, options, plan):
        return await from_stage("LipSyncer", "lipsync", self.ingress.lipsync.sync.remote(
            video, audio, sample_rate, options, plan))


def stage_status(stages: dict, ready: bool) -> JSONResponse:
    """200 with every stage's report, or 503 + Retry-After while a stage is not ready."""
    body = {"status": "ok" if ready else "degraded", "stages": stages}
    headers = {} if ready else {"Retry-After": str(ModelNotLoaded.retry_after)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@app.exception_handler(RequestValidationError)
async def answer_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body (or query) that fails the model: lipserve's 400 invalid_field naming the field, as
    parse_request words it; an unauthorized caller still gets 401 first."""
    ingress = serve.get_replica_context().servable_object
    errors = exc.errors()
    kind = tuple(errors[0].get("loc") or ())[:1]
    try:
        ingress.authorize(request)
        raise invalid_field(errors, prefix=kind if kind and kind[0] in ("body", "query", "path") else ())
    except LipserveError as err:
        return ingress.refuse(err, request_id_of(request))


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    # the ingress only awaits; its admission gate (user_config max_active + max_waiting = 48 in
    # serve_config.yaml) refuses before Serve's own queue does, so callers get our JSON 503
    max_ongoing_requests=64,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 5},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=180,
)
@serve.ingress(app)
class Ingress:
    def __init__(self, speech, voice, lipsync):
        configure_logging()
        # the stages' result types (SpeechResult, VoiceResult, FacePlan, SyncResult) are unpickled
        # here; importing their modules now keeps that cost (torch) out of the first request
        import lipserve.lipsync  # noqa: F401
        import lipserve.tts  # noqa: F401
        import lipserve.voice  # noqa: F401

        self.speech, self.voice, self.lipsync = speech, voice, lipsync
        self.in_flight = InFlight()
        self.configure({})
        self.stage_languages = None  # engine -> languages, asked of the speech stage once
        self.metrics = stage_metrics()
        self.stage_engines: dict[str, str] = {}
        context = serve.get_replica_context()
        self.jobs = JobRunner(job_store(context.app_name), owner=context.replica_id.unique_id)

    async def __del__(self):
        """Serve's graceful shutdown (redeploy, downscale): let this replica's jobs finish first;
        Serve's graceful_shutdown_timeout_s bounds the wait, and what it cuts off is failed as
        job_interrupted by the book once the replica stops reporting."""
        await self.jobs.drain(self.settings.request_timeout_s)

    def configure(self, config: dict) -> None:
        self.settings = replica_settings(config.get("settings"))
        self.storage = Storage(self.settings)
        self.gate = AdmissionGate(config.get("max_active", 8), config.get("max_waiting", 16))
        self.user_config = dict(config)
        set_edge(self.settings.auth_token, self.settings.max_body_bytes, str(self.storage.root),
                 self.settings.max_input_bytes)

    def reconfigure(self, config: dict) -> None:
        """user_config: {"log_level", "settings": {...}, "max_active": 8, "max_waiting": 16}."""
        config = config or {}
        apply_log_level(config)
        self.configure(config)

    def check_health(self) -> None:
        if self.storage is None:
            raise RuntimeError("ingress not configured")

    async def load(self) -> dict:
        """What this ingress holds now (for load tests and operators; not an HTTP route): the
        gate's running and waiting requests, the steps they are in, the config in force."""
        return {"running": self.gate.running, "waiting": self.gate.waiting, "max_active": self.gate.active,
                "max_waiting": self.gate.waiting_limit, "steps": self.in_flight.counts(),
                "user_config": without_secrets(self.user_config), "replica_pid": os.getpid()}

    # ------------------------------------------------------------ helpers

    def authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization", ""), self.settings.auth_token)

    def refuse(self, exc: BaseException, request_id: str) -> JSONResponse:
        """The error answer for a failed request, counted in the failure metric."""
        err = to_lipserve_error(exc)
        self.metrics.failed("request", err.code if err is not None else error_code(exc))
        return error_response(exc, request_id)

    def refuse_unauthorized(self, request: Request) -> JSONResponse | None:
        """The 401 answer for a request without the configured token, else None."""
        try:
            self.authorize(request)
        except LipserveError as exc:
            return error_response(exc, request_id_of(request))
        return None

    async def stage_info(self) -> None:
        """Languages and engines, asked of the stages once (they do not change without a redeploy)."""
        if self.stage_languages is None:
            self.stage_languages = await self.speech.languages.remote()
        if not self.stage_engines:
            voice_desc, lip_desc = await asyncio.gather(self.voice.describe.remote(), self.lipsync.describe.remote())
            self.stage_engines = stage_engines(voice_desc, lip_desc)

    async def describe_stages(self, method: str) -> dict[str, dict]:
        async def ask(name, handle):
            try:
                return name, await asyncio.wait_for(getattr(handle, method).remote(), STAGE_INFO_TIMEOUT_S)
            except Exception as exc:  # a stage that cannot answer is reported as down, with why
                # the type only: a replica's exception text carries its traceback
                return name, {"up": False, "model_loaded": False, "error": type(exc).__name__}

        pairs = await asyncio.gather(ask("tts", self.speech), ask("voice", self.voice), ask("lipsync", self.lipsync))
        return dict(pairs)

    # ------------------------------------------------------------ routes

    @app.post("/api/v1/lip-video", response_model=LipVideoResponse, responses=REQUEST_ERRORS)
    @app.post("/api/v1/lip-video-optimized", response_model=LipVideoResponse, responses=REQUEST_ERRORS,
              description="The old server's name for the same route.")
    async def lip_video(self, request: Request, lip_request: LipVideoRequest = EXAMPLE_BODY):
        """Make the video and answer when it is written (see POST /api/v1/jobs for long work)."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            response = await with_timeout(self._run(lip_request, request_id), self.settings.request_timeout_s)
        except Exception as exc:
            return self.refuse(exc, request_id)
        self.observe(response)
        return response

    async def _run(self, lip_request, request_id, admission: Admission | None = None, progress=None):
        async with (admission if admission is not None else self.gate.reserve()), \
                self.in_flight.request() as track:
            await self.stage_info()

            def report(step: str, event: str, seconds) -> None:
                track(step, event, seconds)  # this ingress's in-flight counts (health, load benchmark)
                if progress is not None:
                    progress(step, event, seconds)  # a job's stages (deployments/jobs.py)

            return await orchestrate(lip_request, request_id, self.settings, self.storage, RemoteStages(self),
                                     progress=report, label="lipserve (serve)")

    def observe(self, response: LipVideoResponse) -> None:
        """The ingress's own steps and the whole request, beside the stages' own latencies."""
        for step in ("download", "upload", "first_frame", "total"):
            if step in response.step_times:
                self.metrics.observe("request" if step == "total" else step, "ingress", response.step_times[step])

    # ------------------------------------------------------------ jobs (deployments/jobs.py)

    @app.post("/api/v1/jobs", status_code=202, response_model=JobStatus, responses=REQUEST_ERRORS)
    async def submit_job(self, request: Request, lip_request: LipVideoRequest = EXAMPLE_BODY):
        """Accept the same request as POST /api/v1/lip-video and answer 202 at once with the job's id
        (also in Location). What can be refused without heavy work (the fields, language, locations,
        an existing output, a full queue) is refused here with the route's error body."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            await self.stage_info()
            await asyncio.to_thread(preflight, lip_request, self.settings, self.storage, self.stage_languages)
            admission = self.gate.reserve()
        except Exception as exc:
            return self.refuse(exc, request_id)
        job_id = uuid.uuid4().hex
        try:
            status = await self.jobs.submit(
                job_id, request_id, lambda progress: self._job_work(lip_request, request_id, admission, progress),
                retention_s=self.settings.job_retention_s, lost_after_s=self.settings.job_lost_after_s)
        except Exception as exc:
            admission.close()
            return self.refuse(exc, request_id)
        return JSONResponse(status, status_code=202, headers={"Location": f"/api/v1/jobs/{job_id}"})

    async def _job_work(self, lip_request, request_id, admission, progress) -> dict:
        """A job's work: the synchronous route's, with its errors as named errors for the book."""
        try:
            response = await with_timeout(self._run(lip_request, request_id, admission, progress),
                                          self.settings.request_timeout_s)
        except Exception as exc:
            err = to_lipserve_error(exc)
            self.metrics.failed("request", err.code if err is not None else error_code(exc))
            if err is None:
                log.error("request %s failed", request_id, exc_info=exc)
                err = InternalError(f"internal error; quote request id {request_id}")
            raise err from None
        finally:
            admission.close()  # a job cancelled before its work began still gives its place back
        self.observe(response)
        return response.model_dump()

    @app.get("/api/v1/jobs/{job_id}", response_model=JobStatus, responses=error_responses(401, 404, 503))
    async def job_status(self, request: Request, job_id: str):
        """queued, running (with the stage), done (`result`: the synchronous route's body) or failed
        (`error`: its error body's member, and `http_status`). A finished job is readable for
        job_retention_s; an unknown or expired id is 404 job_not_found."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            status = await self.jobs.get(job_id, self.settings.job_lost_after_s, self.settings.job_retention_s)
            if status is None:
                raise JobNotFound(f"no job {job_id!r} (unknown, or finished more than "
                                  f"{self.settings.job_retention_s:g} s ago)", field="job_id")
        except Exception as exc:
            return self.refuse(exc, request_id)
        return JSONResponse(status)

    # ------------------------------------------------------------ the try-it page's helpers (lipserve/web)

    @app.post("/api/v1/uploads", status_code=201, response_model=UploadResult,
              responses=error_responses(400, 401, 403, 413, 422, 502, 503),
              openapi_extra={"requestBody": {"required": True, "description": "the video file's bytes",
                                             "content": {"video/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(self, request: Request):
        """Store a source video under uploads/ in the storage root, with a generated name (X-Filename
        may carry the original name, for its suffix). Held to the source limits: max_input_bytes, then
        the video's duration and resolution. Give the answer's `uri` as user_video_gs."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            web.check_upload_size(request.headers.get("content-length"), self.settings)
            data = await read_at_most(request, self.settings.max_input_bytes)
            result = await asyncio.to_thread(web.store_upload, data, request.headers.get("x-filename"),
                                             self.settings, self.storage)
        except Exception as exc:
            return self.refuse(exc, request_id)
        return JSONResponse(result.model_dump(), status_code=201)

    @app.get("/api/v1/media", response_class=Response,
             responses={200: {"description": "the file's bytes", "content": {"video/mp4": {}}},
                        **error_responses(400, 401, 403, 404, 413, 502)})
    async def media(self, request: Request, uri: str = MEDIA_URI):
        """A result (or any media file the API may read: the storage root and the allowed buckets),
        for playback in the page."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            data, kind = await asyncio.to_thread(web.read_media, uri, self.settings, self.storage)
        except Exception as exc:
            return self.refuse(exc, request_id)
        return Response(data, media_type=kind, headers={"Cache-Control": "no-store"})

    @app.get("/api/v1/languages", responses=error_responses(401, 503))
    async def languages(self, request: Request):
        """The TTS languages: per engine, and all of them (for tts_lang)."""
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            await self.stage_info()
        except Exception as exc:
            return self.refuse(exc, request_id)
        engines = self.stage_languages or {}
        return JSONResponse({"engines": engines, "languages": sorted({c for codes in engines.values() for c in codes})})

    @app.get("/health")
    async def health(self, request: Request):
        stages = await self.describe_stages("describe")
        return stage_status(stages, all(s.get("up") and s.get("model_loaded") for s in stages.values()))

    @app.post("/api/v1/preload-models")
    async def preload_models(self, request: Request):
        if (refused := self.refuse_unauthorized(request)) is not None:
            return refused
        stages = await self.describe_stages("warm")
        return stage_status(stages, all(s.get("model_loaded") for s in stages.values()))

    @app.get("/api/v1/models")
    async def models(self, request: Request):
        if (refused := self.refuse_unauthorized(request)) is not None:
            return refused
        stages = await self.describe_stages("describe")
        synthetic = any(s.get("synthetic") for s in stages.values())
        return JSONResponse({"stages": stages, "synthetic_weights": synthetic})
