"""Every failure a user can cause, as a named error with an HTTP status and a stable code.

The ingress turns these into `{"error": {"code", "message", "request_id"}}` with `status`.
Codes are part of the API: never rename one.
"""
from __future__ import annotations

import os
import re


class LipserveError(Exception):
    """Base of all lipserve errors. Unknown exceptions map to 500 `internal`."""

    status: int = 500
    code: str = "internal"
    retry_after: int | None = None  # seconds, sent as Retry-After on 503

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self, request_id: str | None = None) -> dict:
        body = {"code": self.code, "message": self.message, "request_id": request_id}
        if self.field:
            body["field"] = self.field
        return {"error": body}


# 400 — the request itself is wrong
class BadRequest(LipserveError):
    status, code = 400, "bad_request"


class InvalidField(BadRequest):
    code = "invalid_field"


class EmptyText(BadRequest):
    code = "empty_text"


class UnsupportedLanguage(BadRequest):
    code = "unsupported_language"


class InvalidURI(BadRequest):
    code = "invalid_uri"


# 401 / 403 — who may do what
class Unauthorized(LipserveError):
    status, code = 401, "unauthorized"


class Forbidden(LipserveError):
    status, code = 403, "forbidden"


class BucketNotAllowed(Forbidden):
    code = "bucket_not_allowed"


class PathEscape(Forbidden):
    code = "path_outside_root"


# 404 / 409
class SourceNotFound(LipserveError):
    status, code = 404, "source_not_found"


class JobNotFound(LipserveError):
    """No such job, or it finished longer ago than job_retention_s."""

    status, code = 404, "job_not_found"


class OutputExists(LipserveError):
    status, code = 409, "output_exists"


# 413 — over a configured limit
class TooLarge(LipserveError):
    status, code = 413, "too_large"


class InputTooLarge(TooLarge):
    code = "input_too_large"


class VideoTooLong(TooLarge):
    code = "video_too_long"


class ResolutionTooLarge(TooLarge):
    code = "resolution_too_large"


class TextTooLong(TooLarge):
    code = "text_too_long"


class AudioTooLong(TooLarge):
    code = "audio_too_long"


class BodyTooLarge(TooLarge):
    code = "body_too_large"


# 422 — the content cannot be used
class Unprocessable(LipserveError):
    status, code = 422, "unprocessable"


class InvalidMedia(Unprocessable):
    code = "invalid_video"


class InvalidAudio(Unprocessable):
    code = "invalid_audio"


class NoFaceFound(Unprocessable):
    code = "no_face_found"


class NoVoiceFound(Unprocessable):
    code = "no_voice_found"


# 502 — a backend we depend on failed
class BackendError(LipserveError):
    status, code = 502, "backend_error"


class StorageUnavailable(BackendError):
    code = "storage_unavailable"


class TTSUnavailable(BackendError):
    code = "tts_unavailable"


# 503 — try again later
class Unavailable(LipserveError):
    status, code = 503, "unavailable"
    retry_after = 5


class Overloaded(Unavailable):
    code = "overloaded"


class ModelNotLoaded(Unavailable):
    code = "model_not_loaded"


class GPUOutOfMemory(Overloaded):
    """A forward ran out of GPU memory even one item at a time (batches shrink first): the card is
    shared with other work right now, so a retry later can succeed."""

    code = "gpu_out_of_memory"
    retry_after = 10


class StageUnavailable(Unavailable):
    """A stage's replica went away while it held this request (killed, crashed, its node lost).
    Serve starts a new one; nothing was written, so the same request can be sent again."""

    code = "stage_unavailable"
    retry_after = 10  # a replica start loads the stage's models

    def __init__(self, message: str, *, stage: str):
        super().__init__(message)
        self.stage = stage

    def to_dict(self, request_id: str | None = None) -> dict:
        body = super().to_dict(request_id)
        body["error"]["stage"] = self.stage
        return body


class CheckpointFormatError(LipserveError):
    """A checkpoint file is not in the official layout, or its keys do not match the network (an
    operator's fault, never a caller's: 500). Defined here with every other error, so the list of
    codes (lipserve.contract.error_codes, the schema) does not depend on which modules are imported."""

    status, code = 500, "checkpoint_invalid"

class WeightsMissing(Unavailable):
    """Checkpoint files absent and synthetic weights not allowed. Operator's fault, not the caller's."""

    code = "weights_missing"
    retry_after = 60


class JobInterrupted(Unavailable):
    """The ingress replica running a job went away before the job finished; submit it again."""

    code = "job_interrupted"


# 504 / 500
class Timeout(LipserveError):
    status, code = 504, "timeout"


class InternalError(LipserveError):
    status, code = 500, "internal"


# what an error body must never show a caller
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|\n\s*File \"", re.S)
# an absolute path: starts after a space, quote, bracket or '=' (not inside a URL or gs://bucket/name)
_ABS_PATH = re.compile(r"(?<![\w:/.\-~])(/[^\s'\"(),;]+)")
_CREDENTIAL = re.compile(r"(?i)\b(bearer\s+|(?:access_token|id_token|token|key|password|secret|signature)=)[^\s&'\",;]+")
REDACTED = "<redacted>"


def public_message(message: str, *, storage_root: str | os.PathLike | None = None,
                   secrets: tuple[str, ...] = ()) -> str:
    """`message` as it may be shown to a caller: no traceback (cut where one starts), no local
    path outside the storage root (replaced by <path>), no credential (replaced by <redacted>).

    The errors are written to be safe already; this is the net under the ones that wrap a
    library's text (sockets, storage clients, a replica that crashed)."""
    text = str(message)
    cut = _TRACEBACK.search(text)
    if cut:
        text = text[:cut.start()].rstrip() or "error details withheld"
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)
    root = os.path.realpath(storage_root) if storage_root else None

    def path_or_hidden(match: re.Match) -> str:
        path = match.group(1)
        if root and (path == root or path.startswith(root.rstrip("/") + "/")):
            return path
        return "<path>"

    return _ABS_PATH.sub(path_or_hidden, text)


def all_error_classes() -> list[type[LipserveError]]:
    """Every concrete error class (for docs and tests)."""
    seen, stack = [], [LipserveError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
