"""The HTTP contract as pydantic models (docs/SERVING.md has the routes and the error map).

These models are what the ingress's routes take and return, so /openapi.json and /docs show
them as they are here: a field added here appears in the published schema with no other edit.
Limits that come from settings (text length, input size, duration, resolution) are enforced at
run time with their own 413 codes, so they are stated in the descriptions, not as schema bounds.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidField, all_error_classes

# The request the published schema shows as its example (a test posts it to the real graph).
EXAMPLE_REQUEST: dict[str, Any] = {
    "word": "Hello! This video was made by lipserve.",
    "user_video_gs": "gs://my-bucket/selfie.mp4",
    "output_video_gs": "gs://my-bucket/selfie-says-hello.mp4",
    "tts_lang": "en",
    "options": {"face_mode": "track", "overwrite": False},
}


# the lip-sync option rules, defined once: the request's validators below and LipSyncer's own
# check of the options it resolved (lipserve.lipsync.options) both read these
FACE_MODES = ("auto", "static", "track", "box")
MAX_PAD = 512
MAX_RESIZE_FACTOR = 8


class FaceBox(BaseModel):
    """A face box in source pixels: 0 <= x1 < x2, 0 <= y1 < y2."""

    model_config = ConfigDict(extra="forbid")
    x1: int
    y1: int
    x2: int
    y2: int

    @model_validator(mode="after")
    def _ordered(self):
        if self.x2 <= self.x1 or self.y2 <= self.y1 or min(self.x1, self.y1) < 0:
            raise ValueError("box must have 0 <= x1 < x2 and 0 <= y1 < y2")
        return self


class RequestOptions(BaseModel):
    """Per-request knobs. Every field is optional; settings give the defaults."""

    model_config = ConfigDict(extra="forbid")
    face_mode: Literal["auto", "static", "track", "box"] | None = Field(
        None, description="Face finding: auto (one box while the head is still, tracking when it moves), static "
                          "(detect a few frames, keep one box), track (follow a moving face), box (use options.box). "
                          "Default: the face_mode setting (auto).")
    box: FaceBox | None = Field(None, description="Face box in source pixels, for face_mode='box'.")
    pads: tuple[int, int, int, int] | None = Field(
        None, description="Face crop padding in pixels: top, bottom, left, right; each 0..512. Default: the pads setting.")
    resize_factor: int | None = Field(None, ge=1, le=MAX_RESIZE_FACTOR, description="Downscale the source by this factor before lip "
                                                                  "sync. Default: the resize_factor setting.")
    overwrite: bool = Field(False, description="Replace output_video_gs if it exists; otherwise an existing output "
                                               "is 409 output_exists.")
    tts_engine: str = Field("auto", description="auto, piper, espeak or gtts")
    reference_audio: str | None = Field(None, description="gs:// or local path of a separate voice reference")
    audio: str | None = Field(None, description="gs:// or local path of the speech to say, instead of text-to-speech "
                                               "(any audio or video file; `word` may then be empty)")
    deterministic_voice: bool = Field(False, description="FreeVC prior noise off (not FreeVC's own sampling): identical audio for identical input")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Makes the random draws (piper's noise, FreeVC's prior) "
                             "reproducible: the same request and seed give the same video in any process")

    @field_validator("pads")
    @classmethod
    def _pads_in_range(cls, v):
        if v is not None and any(p < 0 or p > MAX_PAD for p in v):
            raise ValueError(f"pads must each be within 0..{MAX_PAD}")
        return v

    @model_validator(mode="after")
    def _box_mode_needs_a_box(self):
        if self.face_mode == "box" and self.box is None:
            raise ValueError("face_mode 'box' needs options.box")
        return self


class LipVideoRequest(BaseModel):
    """One lip-sync request. Locations are gs://bucket/object (bucket on the allow-list) or a path
    under the server's storage root."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_REQUEST]})
    word: str = Field(..., description="What the person will say: a word or a sentence, 1..max_text_chars "
                                       "characters (setting, default 500; more is 413 text_too_long), whose speech "
                                       "lasts at most max_speech_seconds (default 30 s). May be empty when "
                                       "options.audio gives the speech.")
    user_video_gs: str = Field(..., min_length=1, description=(
        "The source selfie video: gs://bucket/object or a path under the storage root. At most max_input_bytes "
        "(default 100 MiB; 413 input_too_large), max_video_seconds (default 60 s; 413 video_too_long) and "
        "max_resolution pixels (default 1920x1080; 413 resolution_too_large)."))
    output_video_gs: str = Field(..., min_length=1, description="Where the mp4 goes (same forms); written only when "
                                                                "the whole request succeeded.")
    tts_lang: str = Field("en", min_length=1, max_length=16, description="Language code for the speech (en, ko, ...; "
                                                                        "GET /api/v1/languages lists them).")
    options: RequestOptions = Field(default_factory=RequestOptions, description="Per-request knobs; all optional.")


class LipVideoResponse(BaseModel):
    request_id: str
    output_video_gs: str
    duration_s: float
    engines: dict[str, str] = Field(description="stage -> engine/checkpoint that ran")
    step_times: dict[str, float] = Field(description="seconds per stage, 'first_frame' (request start to the first lip-synced frame), 'first_fragment' (streamed: to the first MP4 fragment) and 'total'")
    synthetic_weights: bool = Field(description="True when any model ran on synthetic weights: output NOT meaningful")
    cache: dict[str, bool] = Field(default_factory=dict, description="which per-video work was reused (face_boxes, speaker_embedding)")
    warnings: list[str] = Field(default_factory=list)
    stage_spans: dict[str, list[float]] = Field(default_factory=dict, description="stage -> [start, end] unix seconds, measured where the stage ran")
    frames_passed_through: int = Field(0, description="output frames without a face, left exactly as in the source (no lip sync)")
    face_mode: str | None = Field(None, description="how the face boxes were settled: static, track, box, auto/still "
                                                    "or auto/track (the request's face_mode, else the lip-sync stage's)")
    precision: dict[str, str] = Field(default_factory=dict, description="stage -> the precision its networks ran in: fp32, fp16 or bf16")
    voice_similarity: float | None = Field(None, description="cosine between the speaker embeddings of the voice reference and of the converted speech (speaker encoder of the voice stage); higher = closer to the user's voice")


# ---------------------------------------------------------------- errors, as the schema shows them

class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code (lipserve/errors.py); never renamed")
    message: str = Field(description="What went wrong, for a person")
    request_id: str | None = Field(None, description="The X-Request-ID of the request; quote it when reporting")
    field: str | None = Field(None, description="The request field at fault, when there is one")


class ErrorBody(BaseModel):
    """Every failure: this body, with the HTTP status of the error (and Retry-After on 503)."""

    error: ErrorDetail


def error_codes(status: int) -> list[str]:
    """Every error code answered with this HTTP status."""
    return sorted({cls.code for cls in all_error_classes() if cls.status == status and cls.code != "internal"}
                  | ({"internal"} if status == 500 else set()))


_STATUS_MEANING = {
    400: "The request is wrong (a field, the language, a URI)",
    401: "Missing or wrong bearer token",
    403: "A bucket off the allow-list, or a path outside the storage root",
    404: "Not found",
    409: "The output exists and options.overwrite is off",
    413: "Over a configured limit (bytes, duration, resolution, text)",
    422: "The content cannot be used (no face, no voice, not a video)",
    500: "A bug; quote the request_id",
    502: "A storage or TTS backend failed",
    503: "Overloaded, or a stage not ready; retry after Retry-After seconds",
    504: "The request did not finish within request_timeout_s",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """FastAPI `responses=` entries: each status with the error body and the codes it can carry."""
    out = {}
    for status in statuses:
        codes = error_codes(status)
        entry = {"model": ErrorBody,
                 "description": f"{_STATUS_MEANING.get(status, 'Error')}. codes: {', '.join(codes)}"}
        if status == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                "schema": {"type": "integer"}}}
        out[status] = entry
    return out


# ---------------------------------------------------------------- jobs (POST /api/v1/jobs)

JobState = Literal["queued", "running", "done", "failed"]


class StageProgress(BaseModel):
    state: Literal["running", "done", "stopped"] = Field(description="stopped: cut short when the job failed")
    seconds: float | None = Field(None, description="How long the stage took, once done")


class JobStatus(BaseModel):
    """A job's state. `result` is the synchronous route's body once done; `error` its error body's
    `error` member once failed (with the status that route would have answered)."""

    job_id: str
    status: JobState
    stage: str | None = Field(None, description="The stage that started last and is still running")
    stages: dict[str, StageProgress] = Field(default_factory=dict, description="Every stage met so far")
    request_id: str | None = None
    created_at: float = Field(description="unix seconds")
    updated_at: float = Field(description="unix seconds")
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="unix seconds after which a finished job is forgotten (404)")
    result: LipVideoResponse | None = None
    error: ErrorDetail | None = None
    http_status: int | None = Field(None, description="The status the synchronous route would have answered")


class UploadResult(BaseModel):
    """A source video stored under the storage root (POST /api/v1/uploads)."""

    uri: str = Field(description="Give this as user_video_gs")
    bytes: int
    duration_s: float
    width: int
    height: int


def invalid_field(errors: list[dict], prefix: tuple = ()) -> InvalidField:
    """The InvalidField for pydantic's errors: the first one, naming its field (`prefix` is stripped
    from its location, e.g. FastAPI's ("body",)). A body that is not JSON, or not an object, or
    missing, has one message of its own."""
    first = errors[0]
    loc = tuple(first.get("loc") or ())
    if loc[:len(prefix)] == prefix:
        loc = loc[len(prefix):]
    if first.get("type") == "json_invalid" or not loc:
        return InvalidField("the body must be a JSON object", field="body")
    field = ".".join(str(p) for p in loc)
    return InvalidField(f"{field}: {first['msg']}", field=field)


def parse_request(payload: dict) -> LipVideoRequest:
    """Validate a request body; the error names the field and the rule that failed."""
    try:
        return LipVideoRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_field(exc.errors()) from None
