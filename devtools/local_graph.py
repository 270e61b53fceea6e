"""The serving graph on a private local Ray, for the demo, the benchmarks and the tests:

    with local_graph(build_app(LOCAL_CONFIG, env=env), port=8000) as graph:
        httpx.post(graph.url + "/api/v1/lip-video", ...)

starts a local Ray (devtools/local_ray.py), deploys the app with `serve.run`, and at the end
deletes the app (its replicas stop gracefully) and stops the whole cluster, waiting for every
process. Not serve.shutdown(): its controller call only ends when the controller is killed, which
Ray reports as "(raylet) Task ServeController.graceful_shutdown failed ...". Without an app it
only starts and stops the Ray (a test deploys its own config on it).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .local_ray import LocalRay

APP = "lipserve"


@dataclass
class LocalGraph:
    cluster: LocalRay
    port: int
    name: str = APP
    deploy_s: float | None = None  # the Ray's start and the deployment, models loaded and warm

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, deployment: str):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.name)


@contextmanager
def local_graph(app=None, *, port: int = 8000, request_timeout_s: float | None = None, name: str = APP,
                num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[LocalGraph]:
    """A local Ray (every core of this machine unless told), `app` deployed on it as `name` with
    HTTP on 127.0.0.1:`port`; removed and stopped (awaited) on the way out."""
    from ray import serve

    t0 = time.perf_counter()
    cluster = LocalRay(num_cpus=num_cpus, num_gpus=num_gpus).start()
    graph = LocalGraph(cluster, port, name)
    try:
        if app is not None:
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": request_timeout_s})
            serve.run(app, name=name, route_prefix="/")
            graph.deploy_s = time.perf_counter() - t0
        yield graph
    finally:
        try:
            if app is not None:
                serve.delete(name)
        finally:
            cluster.stop()
