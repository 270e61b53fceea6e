"""The Ray half of `make demo` (lipserve/demo.py stays Ray-free): start a local Ray, deploy the
graph with serve_config.local.yaml, send one real HTTP request, shut everything down."""
from __future__ import annotations

import time

import httpx
import ray
from ray import serve


def deploy_and_request(body: dict, env: dict[str, str], port: int = 8000, timeout_s: float = 600) -> dict:
    """Returns {"status", "result" (the JSON answer), "wall_s" (HTTP round trip), "deploy_s"}."""
    from pipeline_graph import LOCAL_CONFIG, build_app

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": timeout_s})
        serve.run(build_app(LOCAL_CONFIG, env=env), name="lipserve", route_prefix="/")
        deploy_s = time.perf_counter() - t0
        print(f"graph deployed on a local Ray in {deploy_s:.1f}s (models load once, in each replica's constructor)",
              flush=True)
        url = f"http://127.0.0.1:{port}/api/v1/lip-video"
        print(f"POST {url} {body}", flush=True)
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=timeout_s)
        return {"status": r.status_code, "result": r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else {"text": r.text}, "wall_s": time.perf_counter() - t, "deploy_s": deploy_s}
    finally:
        serve.shutdown()
        ray.shutdown()
