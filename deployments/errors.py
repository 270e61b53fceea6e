"""The one mapping from whatever a request raised to the error its caller gets, and that answer.

A lipserve error passes as it is, also when it crossed a replica boundary (RayTaskError keeps
it as its `cause`); Serve's queue limit is `overloaded`; a stage replica that went away (killed,
crashed, its node lost, its deployment failed) is `stage_unavailable` naming the stage; anything
else is a bug: logged with its traceback, answered 500 `internal` with the request id to quote.
"""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from lipserve.errors import InternalError, LipserveError, Overloaded, StageUnavailable, Unavailable, public_message

log = logging.getLogger("lipserve.ingress")

# a stage (or the job store) that is not there to answer: Serve starts another
STAGE_LOST = (RayActorError, DeploymentUnavailableError)


def stage_lost(stage: str, exc: BaseException, step: str | None = None) -> StageUnavailable:
    doing = f" running {step}" if step else ""
    return StageUnavailable(f"the {stage} replica{doing} stopped before answering ({type(exc).__name__}); "
                            "Serve is starting another, retry later", stage=stage)


def named_error(exc: BaseException) -> LipserveError | None:
    """Our named error for exc, or None when it is none of ours (a bug)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LipserveError):
        return cause
    if isinstance(exc, LipserveError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("the service is at capacity; retry later")
    if isinstance(exc, STAGE_LOST):
        return stage_lost("unknown", exc)
    return None


def classify(exc: BaseException, request_id: str) -> LipserveError:
    """The error the caller gets for exc; an unknown one is logged with its traceback."""
    err = named_error(exc)
    if err is None:
        log.error("request %s failed", request_id, exc_info=exc)
        return InternalError(f"internal error; quote request id {request_id}")
    if err.status >= 500:
        log.warning("request %s: %s %s", request_id, err.code, err.message)
    return err


def error_response(exc: BaseException, request_id: str, *, storage_root: str | None = None,
                   secrets: tuple[str, ...] = ()) -> JSONResponse:
    """The JSON error body (message through public_message), its status, Retry-After on 503."""
    err = exc if isinstance(exc, LipserveError) else classify(exc, request_id)
    headers = {}
    if err.status == 503:
        headers["Retry-After"] = str(int(err.retry_after or Unavailable.retry_after))
    body = err.to_dict(request_id)
    body["error"]["message"] = public_message(err.message, storage_root=storage_root, secrets=secrets)
    return JSONResponse(body, status_code=err.status, headers=headers)
