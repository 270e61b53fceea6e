"""The HTTP edge, in front of every route (FastAPI's own included): the one place that checks the
bearer token and the body size, both before the app reads or parses a byte of the body.

The token is needed on every route but /health and the static pages (PUBLIC_PATHS); the body is
held to max_body_bytes, an upload's to max_input_bytes. The guard is given where its settings
come from when it is built: the serving ingress replica's (`serving_edge`), or a test's own.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Callable

from starlette.datastructures import Headers

from lipserve.errors import BodyTooLarge, InputTooLarge, InvalidField, LipserveError, Unauthorized
from lipserve.pipeline import new_request_id

from .errors import error_response

# answered without the bearer token: /health (load balancers and probes have none), and the static
# pages a browser opens by address, which cannot carry a header: the try-it page (its calls carry
# the token typed into it), the API docs and the schema they load. None of them reads data or runs work.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/docs-assets/",)
# the one route whose body is a video, not JSON: held to max_input_bytes instead of max_body_bytes
UPLOAD_PATH = "/api/v1/uploads"


@dataclass(frozen=True)
class EdgeConfig:
    """What the edge checks, and what its error answers must not show."""

    token: str | None = None
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 200 * 1024 * 1024
    storage_root: str | None = None

    @classmethod
    def of(cls, settings, storage_root) -> "EdgeConfig":
        return cls(token=settings.serving.auth_token, max_body_bytes=settings.serving.max_body_bytes,
                   max_upload_bytes=settings.limits.max_input_bytes, storage_root=str(storage_root))

    def answer(self, exc: BaseException, request_id: str):
        """The JSON error answer for exc, with this edge's token and storage root kept out of it."""
        return error_response(exc, request_id, storage_root=self.storage_root,
                              secrets=(self.token,) if self.token else ())


def serving_edge() -> EdgeConfig:
    """The edge settings of the ingress replica serving this request, found the way Serve finds a
    route's `self` (a module global would be a copy: Serve ships the Ingress class by value)."""
    from ray import serve

    return serve.get_replica_context().servable_object.edge


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


def route_path(scope) -> str:
    """The request's path below the app's root path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class EdgeGuard:
    """ASGI middleware: the token and the body limit, decided before the app sees the request."""

    def __init__(self, app, config: Callable[[], EdgeConfig]):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        edge = self.config()
        try:
            path = route_path(scope)
            if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                check_bearer(headers.get("authorization", ""), edge.token)
            if path == UPLOAD_PATH:  # a video: the source limit, and the route's own error
                receive = await limit_body(headers, receive, edge.max_upload_bytes, InputTooLarge, "upload")
            else:
                receive = await limit_body(headers, receive, edge.max_body_bytes, BodyTooLarge, "body")
        except LipserveError as exc:
            response = edge.answer(exc, new_request_id(headers.get("x-request-id")))
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
