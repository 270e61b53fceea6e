"""Losing the whole head (SIGKILL of every process under its `ray start`), with and without GCS
fault tolerance, on a multi-node Ray on this machine (devtools/local_cluster.py).

The head hosts no replica (`--num-cpus 0`); one worker node hosts the whole graph; every node runs
a Serve proxy (`proxy_location: EveryNode`) on the same 127.0.0.1 port (Serve binds it with
SO_REUSEPORT), so when the head's proxy goes, new connections reach the worker's. Driverless: the
Serve CLI and HTTP only. With a real Redis (Debian's redis-server, started here on a free loopback
port, no persistence files) as the GCS store, requests keep answering through the outage with the
same replicas, and the head started again with the same command finds the application. The
control run without Redis shows what is lost.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import pytest

from devtools.local_ray import _parent_death_signal, alive, pick_ports
from tests.fixtures.cluster import Graph, graph_env, suite_config, with_lipsync_face_mode
from tests.fixtures.ray import free_port
from tests.fixtures.serve import AUTH, MEASURED, REQUEST_TIMEOUT_S

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OUTAGE_S = 20.0  # the head stays down this long before it is started again
WORKER_RECONNECT_S = 120  # RAY_gcs_rpc_server_reconnect_timeout_s on the worker: above the outage


@pytest.fixture()
def redis_port(tmp_path):
    """A private redis-server on a free loopback port, nothing saved; stopped and checked gone."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server missing: apt-get install redis-server (as `make test` does)"
    port = pick_ports(1)[0]
    data = tmp_path / "redis"
    data.mkdir()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(data), "--daemonize", "no", "--protected-mode", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_parent_death_signal())
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=30)
    assert not alive(process.pid)
    assert not any(data.iterdir()), f"redis left files behind: {list(data.iterdir())}"


def head_loss_graph(tmp_path_factory, redis: int | None):
    from devtools.local_cluster import LocalCluster

    root = tmp_path_factory.mktemp("head-root")
    env = graph_env(root, tmp_path_factory)
    port = free_port()
    config = serve_test_config_every_node(env, port)
    cluster = LocalCluster(num_cpus=0, num_gpus=0, redis_port=redis).start()
    try:
        cluster.add_node("worker", num_cpus=2, num_gpus=2,
                         env={"RAY_gcs_rpc_server_reconnect_timeout_s": str(WORKER_RECONNECT_S)})
        graph = Graph(cluster, root, port, config, tmp_path_factory.mktemp("head-configs"))
        graph.apply(config)
        graph.wait_running()
    except BaseException:
        cluster.stop()
        raise
    return graph


def serve_test_config_every_node(env: dict[str, str], port: int) -> dict:
    config = suite_config(env, port)
    config["proxy_location"] = "EveryNode"  # as serve_config.yaml has it (the suite's graph: HeadOnly)
    return config


def fresh_post(graph: Graph, out: str, word: str) -> httpx.Response:
    """A request on a new connection (a kept-alive one may be to the lost head's proxy)."""
    body = {"word": word, "user_video_gs": "src.mp4", "output_video_gs": out, "tts_lang": "en"}
    return httpx.post(graph.url + "/api/v1/lip-video", json=body, headers=AUTH, timeout=REQUEST_TIMEOUT_S + 30)


def replica_ids(graph: Graph) -> dict[str, str]:
    r = httpx.get(graph.url + "/api/v1/models", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return {stage: desc["replica_id"] for stage, desc in r.json()["stages"].items()}


def submit_job_and_wait(graph: Graph, out: str) -> str:
    body = {"word": "A job before the head goes.", "user_video_gs": "src.mp4", "output_video_gs": out,
            "tts_lang": "en"}
    r = httpx.post(graph.url + "/api/v1/jobs", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        state = httpx.get(f"{graph.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=60).json()["status"]
        if state in ("done", "failed"):
            assert state == "done"
            return job_id
        time.sleep(0.5)
    raise AssertionError("the job did not finish")


def test_the_head_lost_with_gcs_fault_tolerance_loses_nothing(tmp_path_factory, redis_port):
    graph = head_loss_graph(tmp_path_factory, redis_port)
    try:
        assert fresh_post(graph, "out/before-head.mp4", "Before the head goes.").status_code == 200
        job_id = submit_job_and_wait(graph, "out/job-before-head.mp4")
        before = replica_ids(graph)

        killed_at = time.monotonic()
        graph.cluster.kill_head()
        during, statuses = [], []
        while time.monotonic() - killed_at < OUTAGE_S:
            r = fresh_post(graph, f"out/headless-{len(statuses)}.mp4", "While the head is gone.")
            statuses.append(r.status_code if r.status_code == 200 else (r.status_code, r.text[:200]))
            during.append(replica_ids(graph))
        restarted_at = time.monotonic()
        graph.cluster.restart_head()
        head_up_s = time.monotonic() - restarted_at
        running_s = graph.wait_running(timeout_s=300)
        after = replica_ids(graph)

        job = httpx.get(f"{graph.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=60)
        assert job.status_code in (200, 404), job.text
        assert job.headers["content-type"].startswith("application/json")
        if job.status_code == 404:
            assert job.json()["error"]["code"] == "job_not_found"

        config = with_lipsync_face_mode(graph.config, "static")
        redeploy_at = time.monotonic()
        graph.apply(config)
        graph.wait_running()
        r = fresh_post(graph, "out/after-head.mp4", "After the head came back.")
        assert r.status_code == 200, r.text
        redeploy_s = time.monotonic() - redeploy_at
        MEASURED["head lost, GCS in Redis"] = (
            f"{len(statuses)} requests in the {OUTAGE_S:.0f} s outage: {statuses}; replica ids unchanged "
            f"{all(d == before for d in during) and after == before}; the head up again {head_up_s:.1f} s after "
            f"its restart, the app RUNNING {running_s:.1f} s after that; the job from before answered "
            f"{job.status_code}; a user_config redeploy in force and a request 200 {redeploy_s:.1f} s later")
        assert statuses and all(s == 200 for s in statuses), statuses
        assert all(d == before for d in during), during
        assert after == before
        assert r.json()["face_mode"] == "static"
    finally:
        graph.http.close()
        graph.cluster.stop()


def test_the_head_lost_without_gcs_fault_tolerance_loses_the_application(tmp_path_factory):
    """The control run: the same loss without Redis. The worker's replicas may answer for a while,
    but the head started again is a new, empty cluster: the application is gone."""
    graph = head_loss_graph(tmp_path_factory, None)
    try:
        assert fresh_post(graph, "out/before-head.mp4", "Before the head goes.").status_code == 200
        worker = graph.cluster.nodes[0]
        killed_at = time.monotonic()
        graph.cluster.kill_head()
        statuses = []
        while time.monotonic() - killed_at < OUTAGE_S:
            try:
                r = fresh_post(graph, f"out/headless-{len(statuses)}.mp4", "While the head is gone.")
                statuses.append(r.status_code)
            except httpx.HTTPError as exc:  # no proxy left to answer: what a caller sees then
                statuses.append(type(exc).__name__)
                time.sleep(1)
        graph.cluster.restart_head()
        app = graph.status()
        deadline = time.monotonic() + 120
        while worker.running() and time.monotonic() < deadline:  # the new GCS does not know the worker
            time.sleep(1)
        worker_exit_s = time.monotonic() - killed_at
        MEASURED["head lost, no GCS store"] = (
            f"{len(statuses)} requests in the {OUTAGE_S:.0f} s outage: {statuses}; after the restart the app is "
            f"{'gone' if app is None else app['status']}; the worker node's processes "
            f"{'exited' if not worker.running() else 'still run'} {worker_exit_s:.0f} s after the loss")
        assert app is None, app
    finally:
        graph.http.close()
        graph.cluster.stop()
