"""The graph on a multi-node Ray on this machine (devtools/local_cluster.py), losing what a GKE
cluster of spot GPU nodes loses: a worker node (SIGKILL of its whole process tree), a node that
stops answering (SIGSTOP, then SIGCONT), a node drained for preemption, the head's GCS frozen.

The head hosts the ingress, TTS and voice; LipSyncer asks for a resource only the worker nodes
have (`lipsync_node`), so it runs on a worker. Nothing here is a driver of the cluster: the graph
is deployed with the Serve CLI and reached over HTTP only, as an operator reaches it; replica ids
and in-flight steps come from GET /api/v1/models. Intervals are printed in the session summary
("lipserve under faults"); they are measurements, not assertions, except the bounds the issue
sets (a refusal is quick, never the whole request timeout).
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from devtools import testmedia
from tests.fixtures.ray import free_port
from tests.fixtures.serve import AUTH, MEASURED, REQUEST_TIMEOUT_S, TOKEN
from tests.fixtures.serve import test_config as serve_test_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "lipserve"
NODE_RESOURCE = "lipsync_node"
QUICK_REFUSAL_S = 15.0  # "a quick JSON 503": far below the request timeout, with room for a loaded machine
LOST_NODE_ANSWER_S = 60.0  # node health checks notice a lost node in ~4 s; the in-flight call then fails
RECOVERY_LIMIT_S = 240.0


def multi_node_config(env: dict[str, str], port: int) -> dict:
    from pipeline_graph import GPU_CONFIG

    config = serve_test_config(yaml.safe_load(GPU_CONFIG.read_text()), env, port)
    for entry in config["applications"][0]["deployments"]:
        if entry["name"] == "LipSyncer":
            # only a worker node can host it; it takes none of their (zero) CPUs
            entry["ray_actor_options"]["num_cpus"] = 0
            entry["ray_actor_options"]["resources"] = {NODE_RESOURCE: 1}
    return config


class Graph:
    """The deployed graph as an operator sees it: HTTP, the Serve CLI, and the cluster's processes."""

    def __init__(self, cluster, root: Path, port: int, config: dict, folder: Path):
        self.cluster, self.root, self.port, self.config, self.folder = cluster, root, port, config, folder
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S + 30)

    def apply(self, config: dict) -> None:
        path = self.folder / f"serve-config-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli = subprocess.run([str(Path(sys.executable).with_name("serve")), "run", str(path), "--non-blocking",
                              "--address", self.cluster.address], capture_output=True, text=True, timeout=300,
                             env=self.cluster.environment())
        assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-3000:]

    def status(self) -> dict:
        """The app's status and its deployments' replica states, from serve.status() in a driver."""
        out = self.cluster.control(
            "from ray import serve\n"
            f"app = serve.status().applications.get({APP!r})\n"
            "print(json.dumps(None if app is None else {'status': app.status, 'message': app.message,\n"
            "    'deployments': {n: {'status': d.status, 'replicas': d.replica_states} for n, d in app.deployments.items()}}))\n")
        return json.loads(out.strip().splitlines()[-1])

    def wait_running(self, timeout_s: float = 600) -> float:
        t = time.monotonic()
        while time.monotonic() - t < timeout_s:
            app = self.status()
            if app and app["status"] == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values()):
                return time.monotonic() - t
            assert not app or app["status"] != "DEPLOY_FAILED", app
            time.sleep(1)
        raise AssertionError(f"the app did not run within {timeout_s} s: {self.status()}")

    def models(self, timeout_s: float = 30) -> dict:
        r = self.http.get("/api/v1/models", timeout=timeout_s)
        assert r.status_code == 200, r.text
        return r.json()["stages"]

    def post(self, out: str, word: str = "Hello there.", timeout_s: float | None = None) -> tuple[httpx.Response, float]:
        body = {"word": word, "user_video_gs": "src.mp4", "output_video_gs": out, "tts_lang": "en"}
        t = time.perf_counter()
        r = self.http.post("/api/v1/lip-video", json=body, timeout=timeout_s or REQUEST_TIMEOUT_S + 30)
        return r, time.perf_counter() - t

    def written(self, out: str) -> bool:
        return (self.root / out).exists()

    def wait_in_lipsync(self, timeout_s: float = 120) -> str:
        """Poll until LipSyncer runs a request's lip sync; its replica id."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lipsync = self.models()["lipsync"]
            if lipsync.get("in_flight", {}).get("lipsync"):
                return lipsync["replica_id"]
            time.sleep(0.05)
        raise AssertionError(f"LipSyncer never ran lipsync within {timeout_s} s")


def stage_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert "Traceback" not in r.text and TOKEN not in r.text
    if status == 503:
        assert int(r.headers["retry-after"]) > 0
    return err


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from devtools.local_cluster import LocalCluster

    root = tmp_path_factory.mktemp("nodes-root")
    (root / "src.mp4").write_bytes(testmedia.astronaut_clip(seconds=3.0, fps=25, size=(320, 240), audio="speechlike"))
    env = {
        "LIPSERVE_STORAGE_ROOT": str(root),
        "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1",
        "LIPSERVE_WEIGHTS_DIR": str(tmp_path_factory.mktemp("no-weights")),
        "LIPSERVE_TTS_ORDER": "piper",
        "LIPSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "LIPSERVE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "LIPSERVE_AUTH_TOKEN": TOKEN,
    }
    port = free_port()
    config = multi_node_config(env, port)
    t = time.monotonic()
    with LocalCluster(num_cpus=2, num_gpus=1) as cluster:
        cluster.add_node("node2", num_gpus=1, resources={NODE_RESOURCE: 1})
        g = Graph(cluster, root, port, config, tmp_path_factory.mktemp("node-configs"))
        g.apply(config)
        g.wait_running()
        MEASURED["multi-node graph"] = f"head + 1 worker node up and the graph running in {time.monotonic() - t:.0f} s"
        try:
            yield g
        finally:
            g.http.close()
            subprocess.run([str(Path(sys.executable).with_name("serve")), "shutdown", "-y", "--address",
                            cluster.address], capture_output=True, timeout=120, env=cluster.environment())


def node_hosting(graph: Graph, replica_pid: int):
    for node in graph.cluster.nodes:
        if replica_pid in node.tree():
            return node
    return None


def test_a_worker_node_lost_mid_request(graph):
    """SIGKILL of every process of LipSyncer's node while it runs a request: that request is a
    JSON 503 naming LipSyncer, nothing written; while no node can host it /health is 503 and new
    requests are refused at once; a node added back hosts a new replica and requests succeed."""
    r, _ = graph.post("out/before-loss.mp4")
    assert r.status_code == 200, r.text
    lipsync = graph.models()["lipsync"]
    node = node_hosting(graph, lipsync["replica_pid"])
    assert node is not None and node.name == "node2", "LipSyncer is not on the worker node"

    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(graph.post, "out/node-lost.mp4", "The node goes away while this is being made.")
        graph.wait_in_lipsync()
        killed_at = time.monotonic()
        node.kill()
        r, _ = pending.result()
    answered_s = time.monotonic() - killed_at
    err = stage_error(r, 503, "stage_unavailable")
    assert err["stage"] == "LipSyncer", err
    assert answered_s < LOST_NODE_ANSWER_S, answered_s
    assert not graph.written("out/node-lost.mp4")

    # no node can host LipSyncer now: /health says so and a new request is refused quickly
    deadline = time.monotonic() + 60
    while True:
        t = time.monotonic()
        health = graph.http.get("/health", timeout=60)
        health_s = time.monotonic() - t
        if health.status_code == 503 and health.json()["stages"]["lipsync"]["error"] == "no running replica":
            break
        assert time.monotonic() < deadline, health.text
        time.sleep(0.5)
    health_at = time.monotonic() - killed_at
    assert health_s < QUICK_REFUSAL_S, health_s
    r, refused_s = graph.post("out/no-node.mp4", "Nobody can lip sync this now.")
    err = stage_error(r, 503, "stage_unavailable")
    assert err["stage"] == "LipSyncer" and refused_s < QUICK_REFUSAL_S, (err, refused_s)
    assert not graph.written("out/no-node.mp4")

    added_at = time.monotonic()
    graph.cluster.add_node("node2b", num_gpus=1, resources={NODE_RESOURCE: 1})
    joined_s = time.monotonic() - added_at
    while graph.http.get("/health", timeout=60).status_code != 200:
        assert time.monotonic() - added_at < RECOVERY_LIMIT_S, "no LipSyncer replica on the new node"
        time.sleep(1)
    healthy_s = time.monotonic() - added_at
    r, seconds = graph.post("out/after-loss.mp4", "Back on a new node.")
    assert r.status_code == 200, r.text
    new = graph.models()["lipsync"]
    assert new["replica_id"] != lipsync["replica_id"] and node_hosting(graph, new["replica_pid"]).name == "node2b"
    MEASURED["worker node lost"] = (
        f"the request in lip sync answered 503 stage_unavailable {answered_s:.1f} s after the SIGKILL; /health 503 "
        f"({health_s:.2f} s to answer) {health_at:.1f} s after it; a new request refused in {refused_s:.2f} s; "
        f"a node added back joined in {joined_s:.1f} s, /health 200 {healthy_s:.1f} s after the add, "
        f"then a request took {seconds:.1f} s")
