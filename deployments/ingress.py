"""The HTTP front door (FastAPI under Ray Serve): the contract of DESIGN.md over the stage handles.

Per request: pre-flight (text, language, URIs, allow-list, output exists -> 409) before any heavy
work, fetch the source video once and put it in Ray's object store, then the same orchestration
as the one-process Pipeline (lipserve.pipeline.orchestrate) with the stages remote: the video
branch (face plan) runs beside the audio branch (TTS -> voice conversion), lip sync when both
are ready, the output written atomically last.

Overload: Serve's proxy answers 503 + Retry-After once this deployment's max_queued_requests is
full (backpressure_config.retry_after_s). Inside, an admission gate bounds active and waiting
requests and answers our JSON 503 (`overloaded`, Retry-After) before that, and a stage's own
queue limit (BackPressureError) is answered the same way.

The edge (EdgeGuard, in front of every route): the bearer token on every route but /health, and
the body-size limit, both decided before the body is read or parsed. A stage replica that dies
while it holds a request is answered 503 `stage_unavailable` naming the stage (Serve starts a new
one); error messages pass through `public_message` (no traceback, local path or credential).
"""
import asyncio
import hmac
import json
import logging
import os
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import Headers

from lipserve.contract import parse_request
from lipserve.errors import (
    BodyTooLarge,
    InternalError,
    InvalidField,
    LipserveError,
    ModelNotLoaded,
    Overloaded,
    StageUnavailable,
    Unauthorized,
    Unavailable,
    public_message,
)
from lipserve.logs import configure_logging
from lipserve.pipeline import new_request_id, orchestrate, stage_engines, with_timeout
from lipserve.storage import Storage

from .common import apply_log_level, error_code, put_bytes, replica_settings
from .metrics import stage_metrics

log = logging.getLogger("lipserve.ingress")

app = FastAPI(title="lipserve", description="Selfie video + text -> the same person saying it.")

STAGE_INFO_TIMEOUT_S = 15.0
# the only route answered without the bearer token (load balancers and probes have none)
PUBLIC_PATHS = frozenset({"/health"})


@dataclass
class Edge:
    """What the edge checks, from the ingress replica's settings (one ingress per process)."""

    token: str | None = None
    max_body_bytes: int = 64 * 1024
    storage_root: str | None = None


edge = Edge()


def set_edge(token: str | None, max_body_bytes: int, storage_root: str) -> None:
    """Point the edge at the ingress replica's settings. A function of this module on purpose:
    Serve ships the Ingress class to replicas by value, with copies of the globals its methods
    name, so `edge` written from a method would be a copy the guard never reads."""
    edge.token, edge.max_body_bytes, edge.storage_root = token, max_body_bytes, storage_root


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


async def limit_body(headers: Headers, receive, limit: int):
    """The ASGI `receive` the app gets, once the body is known to be at most `limit` bytes.

    A declared Content-Length over the limit is refused without reading a byte; a body without
    one (chunked) is read up to the limit, then handed on from memory."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidField("Content-Length is not a number", field="body") from None
        if size > limit:
            raise BodyTooLarge(f"the request body is {size} bytes; the limit is {limit}", field="body")
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
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes", field="body")
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
            if route_path(scope) not in PUBLIC_PATHS:
                check_bearer(headers.get("authorization", ""), edge.token)
            receive = await limit_body(headers, receive, edge.max_body_bytes)
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
    """At most `active` requests run, at most `waiting` wait for a slot; the rest get 503 at once."""

    def __init__(self, active: int, waiting: int):
        self.active, self.waiting_limit = max(1, int(active)), max(0, int(waiting))
        self._slots = asyncio.Semaphore(self.active)
        self.waiting = 0
        self.running = 0

    @asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self.waiting_limit:
            raise Overloaded(f"{self.active} requests running and {self.waiting} waiting; retry later")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


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

    async def synthesize(self, text, language, engine):
        return await from_stage("SpeechSynthesizer", "tts", self.ingress.speech.synthesize.remote(text, language, engine))

    async def convert(self, audio, sample_rate, reference, reference_is_video, deterministic):
        return await from_stage("VoiceConverter", "voice", self.ingress.voice.convert.remote(
            audio, sample_rate, reference, reference_is_video, deterministic))

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

    def configure(self, config: dict) -> None:
        self.settings = replica_settings(config.get("settings"))
        self.storage = Storage(self.settings)
        self.gate = AdmissionGate(config.get("max_active", 8), config.get("max_waiting", 16))
        self.user_config = dict(config)
        set_edge(self.settings.auth_token, self.settings.max_body_bytes, str(self.storage.root))

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

    @app.post("/api/v1/lip-video")
    @app.post("/api/v1/lip-video-optimized")
    async def lip_video(self, request: Request):
        request_id = request_id_of(request)
        try:
            self.authorize(request)
            try:
                payload = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidField("the body must be a JSON object", field="body") from None
            if not isinstance(payload, dict):
                raise InvalidField("the body must be a JSON object", field="body")
            lip_request = parse_request(payload)
            response = await with_timeout(self._run(lip_request, request_id), self.settings.request_timeout_s)
        except Exception as exc:
            err = to_lipserve_error(exc)
            self.metrics.failed("request", err.code if err is not None else error_code(exc))
            return error_response(exc, request_id)
        # the ingress's own steps and the whole request, beside the stages' own latencies
        for step in ("download", "upload", "total"):
            if step in response.step_times:
                self.metrics.observe("request" if step == "total" else step, "ingress", response.step_times[step])
        return JSONResponse(response.model_dump())

    async def _run(self, lip_request, request_id):
        async with self.gate.slot(), self.in_flight.request() as progress:
            await self.stage_info()
            return await orchestrate(lip_request, request_id, self.settings, self.storage, RemoteStages(self),
                                     progress=progress, label="lipserve (serve)")

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
