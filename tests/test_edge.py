"""The HTTP edge without Ray: the bearer token on every route but /health, the body limit decided
before the body is read, error messages that show no traceback, local path or credential, and
a stage replica's death answered as a 503 naming the stage."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.datastructures import Headers

from deployments import edge, errors, ingress, stages
from deployments.admission import AdmissionGate, InFlight
from lipserve.errors import BodyTooLarge, StageUnavailable, Unauthorized, public_message

TOKEN = "s3cret-token-value"


def _serving(monkeypatch, replica) -> None:
    """Serve's replica context, as a route (and the edge) finds it inside a replica."""
    from ray import serve

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))


@pytest.fixture
def edge_config(tmp_path, monkeypatch):
    config = edge.EdgeConfig(token=TOKEN, max_body_bytes=1000, storage_root=str(tmp_path))
    _serving(monkeypatch, SimpleNamespace(edge=config))  # the real app's guard reads the serving replica's
    yield config


def _toy_app(seen: list, config: edge.EdgeConfig):
    """A stand-in app behind the same guard: records what reached it."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    @app.get("/health")
    async def health():
        seen.append("health")
        return {"status": "ok"}

    app.add_middleware(edge.EdgeGuard, config=lambda: config)
    return app


def _routes(routes, prefix=""):
    """(path, methods) of every route, also inside included routers and mounts."""
    for route in routes:
        if getattr(route, "methods", None) and hasattr(route, "path"):
            yield prefix + route.path, set(route.methods)
        elif hasattr(route, "original_router"):  # FastAPI's included router
            yield from _routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "routes"):  # a Mount
            yield from _routes(route.routes, prefix + route.path)
        elif hasattr(route, "path"):  # a mounted app without routes of its own
            yield prefix + route.path, {"GET"}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


def test_every_route_of_the_ingress_but_the_public_pages_needs_the_token(edge_config):
    """Walks the real app's routes (FastAPI's own included), so a route added later is covered too.
    Public are only /health and the static pages a browser opens by address (no data, no work)."""
    paths = set()
    for path, methods in _routes(ingress.app.routes):
        for method in methods - {"HEAD"}:
            paths.add((method, path.replace("{", "").replace("}", "")))  # a path parameter gets a placeholder
    for path, item in ingress.app.openapi()["paths"].items():  # and whatever the schema lists
        paths |= {(method.upper(), path.replace("{", "").replace("}", "")) for method in item}
    assert ("POST", "/api/v1/lip-video") in paths and ("GET", "/docs") in paths

    async def scenario():
        async with _client(ingress.app) as client:
            answers = {}
            for method, path in paths:
                if path in edge.PUBLIC_PATHS or path.startswith(edge.PUBLIC_PREFIXES):
                    continue
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    r = await client.request(method, path, headers=headers)
                    answers[(method, path, tuple(headers.values()))] = (r.status_code, r.json())
            return answers

    answers = asyncio.run(scenario())
    assert answers
    for key, (status, body) in answers.items():
        assert status == 401 and body["error"]["code"] == "unauthorized", key
        assert TOKEN not in json.dumps(body)
    assert edge.PUBLIC_PATHS == {"/health", "/", "/docs", "/redoc", "/openapi.json"}
    assert edge.PUBLIC_PREFIXES == ("/docs-assets/",)
    assert ("POST", "/api/v1/uploads") in paths and ("GET", "/api/v1/jobs/job_id") in paths


def test_a_body_over_the_limit_is_refused_before_the_app_reads_it(edge_config):
    seen: list = []
    app = _toy_app(seen, edge_config)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def chunks(n_chunks: int, size: int):
        for _ in range(n_chunks):
            yield b"x" * size

    async def scenario():
        async with _client(app) as client:
            declared = await client.post("/echo", content=b"{" + b" " * 5000 + b"}", headers=auth)
            chunked = await client.post("/echo", content=chunks(10, 200), headers=auth)
            small_chunked = await client.post("/echo", content=chunks(3, 100), headers=auth)
            small = await client.post("/echo", content=b"x" * 1000, headers=auth)
            health = await client.get("/health")
            return declared, chunked, small_chunked, small, health

    declared, chunked, small_chunked, small, health = asyncio.run(scenario())
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "body_too_large"
    assert small_chunked.status_code == 200 and small_chunked.json() == {"bytes": 300}
    assert small.status_code == 200 and small.json() == {"bytes": 1000}
    assert health.status_code == 200
    assert seen == [300, 1000, "health"], "the refused bodies never reached the app"


def test_limit_body_never_reads_a_body_whose_declared_length_is_over():
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    headers = Headers(raw=[(b"content-length", b"2000000")])
    with pytest.raises(BodyTooLarge):
        asyncio.run(edge.limit_body(headers, receive, 1_000_000))
    assert reads == []


def test_bearer_check():
    edge.check_bearer("", None)  # no token configured: open
    edge.check_bearer(f"Bearer {TOKEN}", TOKEN)
    edge.check_bearer(f"bearer  {TOKEN}", TOKEN)
    for header in ("", TOKEN, f"Basic {TOKEN}", "Bearer nope", f"Bearer {TOKEN}x"):
        with pytest.raises(Unauthorized):
            edge.check_bearer(header, TOKEN)


def test_public_message_shows_no_traceback_path_or_credential(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    crash = ("worker died: ValueError: bad\nTraceback (most recent call last):\n"
             '  File "/opt/app/lipserve/x.py", line 3, in f\n    raise ValueError\nValueError: bad')
    assert public_message(crash, storage_root=root) == "worker died: ValueError: bad"
    text = public_message(f"cannot read /etc/shadow or {root}/in/a.mp4 (see /home/me/.config)", storage_root=root)
    assert "/etc/shadow" not in text and "/home/me" not in text and f"{root}/in/a.mp4" in text
    kept = "gs://bucket/out/a.mp4 at http://127.0.0.1:4443/storage/v1/b/bucket/o?alt=media"
    assert public_message(kept, storage_root=root) == kept  # URLs and object names are not local paths
    leaky = f"GET /o?access_token=ya29.abc&alt=media failed; Authorization: Bearer {TOKEN}; key=AIzaXYZ"
    text = public_message(leaky, secrets=(TOKEN,))
    assert "ya29.abc" not in text and TOKEN not in text and "AIzaXYZ" not in text and "<redacted>" in text


def test_error_response_passes_messages_through_the_filter(edge_config, tmp_path):
    from lipserve.errors import StorageUnavailable

    exc = StorageUnavailable(f"gs://b/x: storage unreachable (OSError: /var/lib/secret.sock; token={TOKEN})")
    body = json.loads(edge_config.answer(exc, "rid").body)
    message = body["error"]["message"]
    assert "/var/lib" not in message and TOKEN not in message and message.startswith("gs://b/x: storage unreachable")


def test_a_dead_stage_replica_is_a_503_naming_the_stage():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import DeploymentUnavailableError

    async def dies():
        raise ActorDiedError()

    async def unavailable():
        raise DeploymentUnavailableError("LipSyncer")

    for failing in (dies, unavailable):
        with pytest.raises(StageUnavailable) as info:
            asyncio.run(stages.from_stage("VoiceConverter", "voice", failing()))
        err = info.value
        assert err.status == 503 and err.code == "stage_unavailable" and err.retry_after
        body = err.to_dict("rid")["error"]
        assert body["stage"] == "VoiceConverter" and "VoiceConverter" in body["message"]
    r = errors.error_response(info.value, "rid")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 5


def test_in_flight_steps_and_gate_counts():
    async def scenario():
        flight, gate = InFlight(), AdmissionGate(active=1, waiting=2)
        release = asyncio.Event()
        snapshots = []

        async def request(step):
            async with gate.slot(), flight.request() as progress:
                progress(step, "start", None)
                await release.wait()
                progress(step, "end", 1.0)

        tasks = [asyncio.create_task(request(s)) for s in ("tts", "voice")]
        await asyncio.sleep(0.05)
        snapshots.append((gate.running, gate.waiting, flight.counts()))
        release.set()
        await asyncio.gather(*tasks)
        snapshots.append((gate.running, gate.waiting, flight.counts()))
        return snapshots

    during, after = asyncio.run(scenario())
    assert during == (1, 1, {"tts": 1})
    assert after == (0, 0, {})


def test_the_guard_reads_the_settings_of_an_ingress_shipped_by_value(tmp_path, monkeypatch):
    """Serve pickles the Ingress class by value (the module name `Ingress` is the deployment, not
    the class), so its methods run with copies of the module globals they name; the settings
    they give the edge must still reach the guard, which Serve imports by reference."""
    from ray import cloudpickle

    shipped = cloudpickle.loads(cloudpickle.dumps(ingress.Ingress.func_or_class))
    replica = SimpleNamespace()  # configure() only sets attributes
    _serving(monkeypatch, replica)
    shipped.configure(replica, {"settings": {"auth_token": "shipped-token", "max_body_bytes": 1234,
                                    "storage_root": str(tmp_path)}})
    guarded = edge.serving_edge()  # what the guard in front of the real app reads
    assert (guarded.token, guarded.max_body_bytes) == ("shipped-token", 1234)
    assert guarded.storage_root == str(tmp_path.resolve())
