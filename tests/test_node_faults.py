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
from collections import Counter
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.cluster import (NODE_RESOURCE, Graph, fault_during_lipsync, graph_env, multi_node_config,
                                    stage_error, with_lipsync_face_mode)
from tests.fixtures.ray import free_port
from tests.fixtures.serve import MEASURED

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUICK_REFUSAL_S = 15.0  # "a quick JSON 503": far below the request timeout, with room for a loaded machine
LOST_NODE_ANSWER_S = 60.0  # node health checks notice a lost node in ~4 s; the in-flight call then fails
RECOVERY_LIMIT_S = 240.0


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from devtools.local_cluster import LocalCluster

    root = tmp_path_factory.mktemp("nodes-root")
    env = graph_env(root, tmp_path_factory)
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

    r, answered_s = fault_during_lipsync(graph, "out/node-lost.mp4", "The node goes away while this is being made.",
                                         node.kill)
    killed_at = time.monotonic() - answered_s
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


def test_a_worker_node_that_stops_answering_mid_request(graph):
    """SIGSTOP of every process of LipSyncer's node while it runs a request, SIGCONT later: the
    request is a bounded JSON 503 (or 504), nothing written; the node, declared dead meanwhile,
    ends its own processes once it runs again; a fresh node takes over."""
    lipsync = graph.models()["lipsync"]
    node = node_hosting(graph, lipsync["replica_pid"])
    assert node is not None
    r, answered_s = fault_during_lipsync(graph, "out/node-frozen.mp4", "The node stops answering while this is made.",
                                         node.freeze)
    answered = r.status_code
    assert answered in (503, 504), r.text
    err = stage_error(r, answered, "stage_unavailable" if answered == 503 else "timeout")
    assert answered == 504 or err["stage"] == "LipSyncer", err
    assert answered_s < LOST_NODE_ANSWER_S, answered_s
    time.sleep(2)
    thawed_at = time.monotonic()
    node.thaw()
    left = node.running()
    deadline = thawed_at + 60
    while left and time.monotonic() < deadline:  # the raylet learns it was declared dead, and exits
        time.sleep(0.5)
        left = node.running()
    gone_s = time.monotonic() - thawed_at
    assert not graph.written("out/node-frozen.mp4")
    added_at = time.monotonic()
    graph.cluster.add_node("node3", num_gpus=1, resources={NODE_RESOURCE: 1})
    while graph.http.get("/health", timeout=60).status_code != 200:
        assert time.monotonic() - added_at < RECOVERY_LIMIT_S, "no LipSyncer replica on the new node"
        time.sleep(1)
    r, _ = graph.post("out/after-freeze.mp4", "Back after a frozen node.")
    assert r.status_code == 200, r.text
    MEASURED["worker node frozen"] = (
        f"the request in lip sync answered {answered} {err['code']} "
        f"{answered_s:.1f} s after the SIGSTOP; after SIGCONT the node's processes "
        f"{'exited' if not left else f'were still {len(left)}'} within {gone_s:.1f} s; a new node served "
        f"{time.monotonic() - added_at:.1f} s after it was added")
    assert not left, f"{len(left)} processes of the frozen node still run {gone_s:.0f} s after SIGCONT"


def test_a_node_drained_for_preemption_under_steady_traffic_moves_the_stage_with_zero_failures(graph):
    """Two nodes can host LipSyncer; `ray drain-node` (reason preemption, 60 s deadline) of the one
    that runs it while requests keep coming. Ray Serve 2.60 does not keep the old replica until the
    replacement runs: 1.6 s after the drain its states were STOPPING 1 + STARTING 1, then STARTING 1
    alone until the new replica ran ~10 s after the drain. A request in that gap waits for the
    replacement (it is starting, and a live node can host it: deployments/availability.py) instead
    of being refused, so every request answers 200 and the replica moves to the other node."""
    graph.cluster.add_node("node4", num_gpus=1, resources={NODE_RESOURCE: 1})
    before = graph.models()["lipsync"]
    node = node_hosting(graph, before["replica_pid"])
    assert node is not None
    answers: list[int] = []
    first_failure: list = []
    took: list[float] = []
    stop = [False]

    def traffic() -> None:
        i = 0
        while not stop[0]:
            r, seconds = graph.post(f"out/drain-{i}.mp4", "Steady traffic during a drain.")
            took.append(seconds)
            is_json = r.headers.get("content-type", "").startswith("application/json")
            answers.append(200 if r.status_code == 200 else
                           (r.status_code, r.json()["error"]["code"] if is_json else r.text[:100]))
            if r.status_code != 200 and not first_failure:
                first_failure.append(r.json()["error"] if is_json else r.text[:300])
            i += 1

    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(traffic)
        try:
            while len(answers) < 1:
                time.sleep(0.2)
            drained_at = time.monotonic()
            done = node.drain(deadline_s=60)
            assert done.returncode == 0, done.stdout + done.stderr
            moved_s = None
            while time.monotonic() - drained_at < RECOVERY_LIMIT_S:
                now = graph.models()["lipsync"]
                if now.get("replica_id", before["replica_id"]) != before["replica_id"]:  # an error has none
                    moved_s = time.monotonic() - drained_at
                    break
                time.sleep(0.5)
            served_before = len(answers)
            more_by = time.monotonic() + RECOVERY_LIMIT_S
            while len(answers) < served_before + 3 and time.monotonic() < more_by:  # more on the new replica
                time.sleep(0.2)
        finally:
            stop[0] = True  # the traffic thread ends even when a step above fails
        running.result()
    after = graph.models()["lipsync"]
    failed = [a for a in answers if a != 200]
    codes = Counter(f"{status} {code}" for status, code in failed)
    MEASURED["node drained (preemption)"] = (
        f"{len(answers)} requests, {len(failed)} failed {dict(codes)} (first: {first_failure[:1]}); "
        f"the new replica answered {moved_s:.1f} s after `ray drain-node`; the longest request took "
        f"{max(took):.1f} s, the median {sorted(took)[len(took) // 2]:.1f} s" if moved_s is not None
        else f"{len(answers)} requests, the replica never moved")
    assert moved_s is not None, "the replica did not move off the drained node"
    assert node_hosting(graph, after["replica_pid"]) is not node
    assert failed == [], (failed, first_failure)
    assert len(answers) >= served_before + 3, answers  # and the new replica went on answering


def test_the_gcs_frozen_for_20_s_keeps_answering_and_a_redeploy_applies_after(graph):
    """SIGSTOP of the head's gcs_server for 20 s (below the raylets' 60 s reconnect timeout):
    requests through the running graph keep answering 200 with the same replicas, a job is accepted
    or refused as JSON in bounded time; after SIGCONT a user_config redeploy applies."""
    from devtools.local_cluster import signal_all

    before = {stage: desc["replica_id"] for stage, desc in graph.models().items()}
    gcs = graph.cluster.gcs_pids()
    assert gcs, "no gcs_server under the head"
    answers, job = [], None
    signal_all(gcs, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        while time.monotonic() - frozen_at < 20 - 8:  # a request takes a few seconds; all start frozen
            t = time.monotonic()
            try:
                r, seconds = graph.post(f"out/gcs-frozen-{len(answers)}.mp4", "While the control store is frozen.",
                                        timeout_s=60)
                answers.append((r.status_code, round(seconds, 1), r.text[:200] if r.status_code != 200 else ""))
            except httpx.TimeoutException:  # recorded: the assertion below says what was seen
                answers.append(("no answer", round(time.monotonic() - t, 1), ""))
        during = {stage: desc["replica_id"] for stage, desc in graph.models().items()}
        t = time.monotonic()
        job = graph.http.post("/api/v1/jobs", json={"word": "A job while frozen.", "user_video_gs": "src.mp4",
                                                    "output_video_gs": "out/gcs-job.mp4", "tts_lang": "en"}, timeout=60)
        job_s = time.monotonic() - t
        while time.monotonic() - frozen_at < 20:
            time.sleep(0.2)
    finally:
        signal_all(gcs, signal.SIGCONT)
    MEASURED["GCS frozen 20 s"] = (f"requests during the freeze (status, seconds): {[a[:2] for a in answers]}; "
                                   f"POST /api/v1/jobs answered {job.status_code} in {job_s:.2f} s")
    assert answers and all(status == 200 for status, _, _ in answers), answers
    assert during == before
    # the job book is found through the GCS on a replica's first use: a bounded JSON 503 then
    assert job.status_code == 202 or stage_error(job, 503, "stage_unavailable")["stage"] == "JobStore", job.text
    assert job_s < QUICK_REFUSAL_S, job_s
    job_state = None
    if job.status_code == 202:
        job_id = job.json()["job_id"]
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while time.monotonic() < deadline:
            polled = graph.http.get(f"/api/v1/jobs/{job_id}", timeout=60)
            assert polled.status_code in (200, 404), polled.text
            job_state = polled.json().get("status") if polled.status_code == 200 else "not found"
            if job_state in ("done", "failed", "not found"):
                break
            time.sleep(1)

    config = with_lipsync_face_mode(graph.config, "static")
    redeploy_at = time.monotonic()
    graph.apply(config)
    graph.wait_running()
    r, _ = graph.post("out/after-gcs.mp4", "After the control store came back.")
    assert r.status_code == 200, r.text
    assert r.json()["face_mode"] == "static"
    graph.config = config
    MEASURED["GCS frozen 20 s"] += (f"; replica ids unchanged; the job then: {job_state}; a user_config "
                                    f"redeploy after SIGCONT in force {time.monotonic() - redeploy_at:.1f} s later")
