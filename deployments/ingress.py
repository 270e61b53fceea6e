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
"""
import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from lipserve.contract import parse_request
from lipserve.errors import (
    InternalError,
    InvalidField,
    LipserveError,
    ModelNotLoaded,
    Overloaded,
    Unauthorized,
    Unavailable,
)
from lipserve.logs import configure_logging
from lipserve.pipeline import new_request_id, orchestrate, stage_engines, with_timeout
from lipserve.storage import Storage

from .common import apply_log_level, error_code, put_bytes, replica_settings
from .metrics import stage_metrics

log = logging.getLogger("lipserve.ingress")

app = FastAPI(title="lipserve", description="Selfie video + text -> the same person saying it.")

STAGE_INFO_TIMEOUT_S = 15.0


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
    return JSONResponse(err.to_dict(request_id), status_code=err.status, headers=headers)


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

    @asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self.waiting_limit:
            raise Overloaded(f"{self.active} requests running and {self.waiting} waiting; retry later")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


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
        return await self.ingress.speech.synthesize.remote(text, language, engine, seed)

    async def convert(self, audio, sample_rate, reference, reference_is_video, deterministic, seed):
        return await self.ingress.voice.convert.remote(audio, sample_rate, reference, reference_is_video,
                                                       deterministic, seed)

    async def plan_faces(self, video, options, frames_needed):
        return await self.ingress.lipsync.plan_faces.remote(video, options, frames_needed)

    async def sync(self, video, audio, sample_rate, options, plan):
        return await self.ingress.lipsync.sync.remote(video, audio, sample_rate, options, plan)


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
        self.configure({})
        self.stage_languages = None  # engine -> languages, asked of the speech stage once
        self.metrics = stage_metrics()
        self.stage_engines: dict[str, str] = {}

    def configure(self, config: dict) -> None:
        self.settings = replica_settings(config.get("settings"))
        self.storage = Storage(self.settings)
        self.gate = AdmissionGate(config.get("max_active", 8), config.get("max_waiting", 16))

    def reconfigure(self, config: dict) -> None:
        """user_config: {"log_level", "settings": {...}, "max_active": 8, "max_waiting": 16}."""
        config = config or {}
        apply_log_level(config)
        self.configure(config)

    def check_health(self) -> None:
        if self.storage is None:
            raise RuntimeError("ingress not configured")

    # ------------------------------------------------------------ helpers

    def authorize(self, request: Request) -> None:
        token = self.settings.auth_token
        if not token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

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
                return name, {"up": False, "model_loaded": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

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
        for step in ("download", "upload", "first_frame", "total"):
            if step in response.step_times:
                self.metrics.observe("request" if step == "total" else step, "ingress", response.step_times[step])
        return JSONResponse(response.model_dump())

    async def _run(self, lip_request, request_id):
        async with self.gate.slot():
            await self.stage_info()
            return await orchestrate(lip_request, request_id, self.settings, self.storage, RemoteStages(self),
                                     label="lipserve (serve)")

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
