"""The HTTP front door (FastAPI under Ray Serve): the routes of docs/SERVING.md over the stage handles.

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

Who owns what around the routes: the token and the body size, the edge (deployments/edge.py);
how many requests run, the admission gate (deployments/admission.py); what an exception is
answered with, deployments/errors.py; the stage calls, deployments/stages.py.
"""
import asyncio
import os
import uuid

from fastapi import Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

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
from lipserve.errors import JobNotFound, LipserveError, ModelNotLoaded
from lipserve.logs import configure_logging
from lipserve.checks import preflight
from lipserve.pipeline import new_request_id, orchestrate, with_timeout
from lipserve.storage import Storage

from .admission import Admission, AdmissionGate, InFlight
from .availability import StageAvailability
from .common import apply_log_level, replica_settings
from .edge import EdgeConfig
from .errors import classify
from .jobs import JobRunner, job_store
from .metrics import stage_metrics
from .stages import RemoteStages
from .streamed import stream_answer
from .webapp import app

# what the lip-video and job routes can answer besides success (each with its codes, in the schema)
# the settings sections the ingress reads: its user_config.settings may set only these
INGRESS_SECTIONS = ("serving", "limits", "storage")
REQUEST_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 500, 502, 503, 504)
EXAMPLE_BODY = Body(openapi_examples={"gcs": {"summary": "gs:// in, gs:// out", "value": EXAMPLE_REQUEST}})
# (an example given as openapi_examples, also because a plain `example` does not survive Serve's
# copy of the app: FastAPI's "unset" marker is compared by identity, and the copy prints it as {})
MEDIA_URI = Query(..., description="gs:// or storage-root path of a media file",
                  openapi_examples={"result": {"summary": "a result under the storage root",
                                               "value": "results/0123abcd.mp4"}})


def without_secrets(user_config: dict) -> dict:
    settings = {k: v for k, v in (user_config.get("settings") or {}).items() if k != "auth_token"}
    return {**user_config, "settings": settings} if "settings" in user_config else dict(user_config)


def request_id_of(request: Request) -> str:
    """Serve's proxy puts X-Request-ID on every request (the caller's, or one it generates) and
    echoes it on the response; the error bodies and logs use the same id."""
    return request.headers.get("x-request-id") or new_request_id()


def stage_status(stages: dict, ready: bool) -> JSONResponse:
    """200 with every stage's report, or 503 + Retry-After while a stage is not ready."""
    body = {"status": "ok" if ready else "degraded", "stages": stages}
    headers = {} if ready else {"Retry-After": str(ModelNotLoaded.retry_after)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


@app.exception_handler(RequestValidationError)
async def answer_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body (or query) that fails the model: lipserve's 400 invalid_field naming the field, as
    parse_request words it (the edge has let only an authorized caller this far)."""
    ingress = serve.get_replica_context().servable_object
    errors = exc.errors()
    kind = tuple(errors[0].get("loc") or ())[:1]
    err = invalid_field(errors, prefix=kind if kind and kind[0] in ("body", "query", "path") else ())
    return ingress.refuse(err, request_id_of(request))


@serve.deployment(name="Ingress")  # its resources and limits: the serve configs
@serve.ingress(app)
class Ingress:
    def __init__(self, speech, voice, lipsync):
        configure_logging()
        # the stages' result types (SpeechResult, VoiceResult, FacePlan, SyncResult) are unpickled
        # here; importing their modules now keeps that cost (torch) out of the first request
        import lipserve.lipsync  # noqa: F401
        import lipserve.tts  # noqa: F401
        import lipserve.voice  # noqa: F401

        self.stages = RemoteStages(speech, voice, lipsync)
        self.in_flight = InFlight()
        self.configure({})
        self.metrics = stage_metrics()
        context = serve.get_replica_context()
        self.jobs = JobRunner(job_store(context.app_name), owner=context.replica_id.unique_id)
        self.availability = StageAvailability(context.app_name, tuple(self.stages.deployment_of.values()))

    async def __del__(self):
        """Serve's graceful shutdown (redeploy, downscale): let this replica's jobs finish first;
        Serve's graceful_shutdown_timeout_s bounds the wait, and what it cuts off is failed as
        job_interrupted by the book once the replica stops reporting."""
        await self.jobs.drain(self.settings.serving.request_timeout_s)

    def configure(self, config: dict) -> None:
        self.settings = replica_settings(config.get("settings"), INGRESS_SECTIONS, "Ingress")
        self.storage = Storage(self.settings)
        self.gate = AdmissionGate(config.get("max_active", 8), config.get("max_waiting", 16))
        self.edge = EdgeConfig.of(self.settings, self.storage.root)  # what the edge reads (serving_edge)
        self.user_config = dict(config)

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

    def failure(self, exc: BaseException, request_id: str) -> LipserveError:
        """The named error for a failed request, counted in the failure metric."""
        err = classify(exc, request_id)
        self.metrics.failed("request", err.code)
        return err

    def refuse(self, exc: BaseException, request_id: str) -> JSONResponse:
        """The error answer for a failed request."""
        return self.edge.answer(self.failure(exc, request_id), request_id)

    # ------------------------------------------------------------ routes

    @app.post("/api/v1/lip-video", response_model=LipVideoResponse, responses=REQUEST_ERRORS)
    @app.post("/api/v1/lip-video-optimized", response_model=LipVideoResponse, responses=REQUEST_ERRORS,
              description="The old server's name for the same route.")
    async def lip_video(self, request: Request, lip_request: LipVideoRequest = EXAMPLE_BODY):
        """Make the video and answer when it is written (see POST /api/v1/jobs for long work)."""
        request_id = request_id_of(request)
        try:
            response = await with_timeout(self._run(lip_request, request_id), self.settings.serving.request_timeout_s)
        except Exception as exc:
            return self.refuse(exc, request_id)
        self.observe(response)
        return response

    @app.post("/api/v1/lip-video/stream", responses={200: {"content": {"video/mp4": {}},
                                                          "description": "fragmented MP4, sent as it is made"},
                                                     **REQUEST_ERRORS})
    async def lip_video_stream(self, request: Request, lip_request: LipVideoRequest = EXAMPLE_BODY):
        """The same request as POST /api/v1/lip-video, answered with the video itself as it is made
        (fragmented MP4, chunked); the output is still written whole at the end (docs/SERVING.md)."""
        request_id = request_id_of(request)

        def run(send):
            return with_timeout(self._run(lip_request, request_id, send=send), self.settings.serving.request_timeout_s)

        return await stream_answer(run, request_id, refuse=lambda exc: self.refuse(exc, request_id),
                                   failed=lambda exc: self.failure(exc, request_id), answered=self.observe)

    async def stages_ready(self, wait: bool = True) -> None:
        """Refuse (503 naming the stage) while a stage has no replica to run the request: at once
        when no live node can host one; a replacement that is starting is waited for (up to
        replacement_wait_s), or with `wait=False` (a job) let through to Serve's queue."""
        self.availability.start()
        await self.availability.check(self.settings.serving.replacement_wait_s if wait else 0.0)

    async def _run(self, lip_request, request_id, admission: Admission | None = None, progress=None, send=None):
        if admission is None:  # a job was checked when it was accepted
            await self.stages_ready()
        async with (admission if admission is not None else self.gate.reserve()), \
                self.in_flight.request() as track:
            await self.stages.load_info()

            def report(step: str, event: str, seconds) -> None:
                track(step, event, seconds)  # this ingress's in-flight counts (health, load benchmark)
                if progress is not None:
                    progress(step, event, seconds)  # a job's stages (deployments/jobs.py)

            return await orchestrate(lip_request, request_id, self.settings, self.storage, self.stages,
                                     progress=report, label="lipserve (serve)", send=send)

    def observe(self, response: LipVideoResponse) -> None:
        """The ingress's own steps and the whole request, beside the stages' own latencies."""
        for step in ("download", "upload", "first_frame", "first_fragment", "total"):
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
            await self.stages_ready(wait=False)  # answered at once; the job's call waits in Serve's queue
            await self.stages.load_info()
            await asyncio.to_thread(preflight, lip_request, self.settings, self.storage, self.stages.languages())
            admission = self.gate.reserve()
        except Exception as exc:
            return self.refuse(exc, request_id)
        job_id = uuid.uuid4().hex
        try:
            status = await self.jobs.submit(
                job_id, request_id, lambda progress: self._job_work(lip_request, request_id, admission, progress),
                retention_s=self.settings.serving.job_retention_s, lost_after_s=self.settings.serving.job_lost_after_s)
        except Exception as exc:
            admission.close()
            return self.refuse(exc, request_id)
        return JSONResponse(status, status_code=202, headers={"Location": f"/api/v1/jobs/{job_id}"})

    async def _job_work(self, lip_request, request_id, admission, progress) -> dict:
        """A job's work: the synchronous route's, with its errors as named errors for the book."""
        try:
            response = await with_timeout(self._run(lip_request, request_id, admission, progress),
                                          self.settings.serving.request_timeout_s)
        except Exception as exc:
            raise self.failure(exc, request_id) from None
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
            status = await self.jobs.get(job_id, self.settings.serving.job_lost_after_s, self.settings.serving.job_retention_s)
            if status is None:
                raise JobNotFound(f"no job {job_id!r} (unknown, or finished more than "
                                  f"{self.settings.serving.job_retention_s:g} s ago)", field="job_id")
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
            data = await request.body()  # the edge has held it to max_input_bytes
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
            data, kind = await asyncio.to_thread(web.read_media, uri, self.settings, self.storage)
        except Exception as exc:
            return self.refuse(exc, request_id)
        return Response(data, media_type=kind, headers={"Cache-Control": "no-store"})

    @app.get("/api/v1/languages", responses=error_responses(401, 503))
    async def languages(self, request: Request):
        """The TTS languages: per engine, and all of them (for tts_lang)."""
        request_id = request_id_of(request)
        try:
            await self.stages.load_info()
        except Exception as exc:
            return self.refuse(exc, request_id)
        engines = self.stages.languages() or {}
        return JSONResponse({"engines": engines, "languages": sorted({c for codes in engines.values() for c in codes})})

    @app.get("/health")
    async def health(self, request: Request):
        self.availability.start()
        stages = await self.stages.report("describe", tuple(await self.availability.confirmed_missing()))
        return stage_status(stages, all(s.get("up") and s.get("model_loaded") for s in stages.values()))

    @app.post("/api/v1/preload-models")
    async def preload_models(self, request: Request):
        stages = await self.stages.report("warm")
        return stage_status(stages, all(s.get("model_loaded") for s in stages.values()))

    @app.get("/api/v1/models")
    async def models(self, request: Request):
        self.availability.start()
        stages = await self.stages.report("describe", tuple(await self.availability.confirmed_missing()))
        synthetic = any(s.get("synthetic") for s in stages.values())
        return JSONResponse({"stages": stages, "synthetic_weights": synthetic})
