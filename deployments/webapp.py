"""The FastAPI app the ingress serves, and what it needs beyond the ingress's routes: the schema
(FastAPI's own 422 entries dropped, since validation failures are answered as lipserve's 400),
the /docs and /redoc pages from the package (no CDN), the middleware (the edge, outermost, then
JSON bodies), the try-it page.

The routes themselves are the Ingress's methods (deployments/ingress.py), registered on this app.
"""
from __future__ import annotations

import json
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from lipserve import web

from .edge import EdgeGuard, route_path, serving_edge

# the API's JSON bodies are read as JSON whatever their Content-Type says, as the route always did
JSON_BODY_PATHS = ("/api/v1/lip-video", "/api/v1/lip-video-optimized", "/api/v1/jobs")


class LipserveAPI(FastAPI):
    """FastAPI whose schema tells the truth about errors: a request that fails validation is
    answered with lipserve's 400 invalid_field (answer_invalid_request), never FastAPI's 422 shape,
    so the 422 entries FastAPI adds on its own are dropped from /openapi.json."""

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            schema = super().openapi()  # fills self.openapi_schema
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    answer = operation.get("responses", {}).get("422", {})
                    if "HTTPValidationError" in json.dumps(answer):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return self.openapi_schema


app = LipserveAPI(title="lipserve", version="0.1.0", docs_url=None, redoc_url=None, description=(
    "Selfie video + text -> the same person saying it, in their own voice, lips in sync.\n\n"
    "Every failure answers `{\"error\": {\"code\", \"message\", \"request_id\"}}` with the status that "
    "says whose fault it was; 503 comes with `Retry-After`. When the server has a token, every route but "
    "`/health`, this schema, the docs pages and the page at `/` needs `Authorization: Bearer <token>`. "
    "`POST /api/v1/jobs` runs the same request in the background for work longer than a client's timeout."))

# /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline package, not from a CDN
# (a server without internet, or a browser behind a proxy, still shows them)
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")


@app.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title="lipserve - API",
                               swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                               swagger_favicon_url=f"{root}/docs-assets/favicon.png")


@app.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title="lipserve - API",
                          redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
                          redoc_favicon_url=f"{root}/docs-assets/favicon.png", with_google_fonts=False)


class JSONBodies:
    """ASGI middleware: the JSON routes' bodies are JSON whatever their Content-Type says (missing,
    text/plain, form-encoded), as the route read them before it took a model; FastAPI would
    otherwise refuse them before our code runs."""

    def __init__(self, asgi_app, paths: tuple[str, ...]):
        self.app, self.paths = asgi_app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) in self.paths:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


app.add_middleware(JSONBodies, paths=JSON_BODY_PATHS)
app.add_middleware(EdgeGuard, config=serving_edge)  # added last: it runs first


@app.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """A page to try it: pick or name a video, type a sentence, watch the stages, play the result."""
    return HTMLResponse(web.page_html())

