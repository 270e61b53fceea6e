"""The graph under faults, on the same deployment as test_serve.py (which runs first): the HTTP
edge, storage failing mid-request, each stage's replica killed mid-request, the ingress killed
between requests, and a redeploy under traffic. Nothing is written by a failed request, every
failure is a JSON error that names what failed, and the graph serves again afterwards.

The last test leaves the graph with another config, and the module removes it at the end.
Recovery times are printed in the summary ("lipserve under faults"); they are measurements, not
assertions (a 2-core machine shared with other work).
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import os
import re
import signal
import time

import httpx
import pytest

from lipserve import media
from tests.fixtures.serve import (
    APP,
    AUTH,
    CLIENT_TIMEOUT_S,
    MEASURED,
    REQUEST_TIMEOUT_S,
    STORAGE_TIMEOUT_S,
    TOKEN,
    remove_graph,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# a replica start loads its models; on a loaded 2-core box that is tens of seconds, not minutes
RECOVERY_LIMIT_S = 240


@pytest.fixture(scope="module", autouse=True)
def graph(served):
    yield served
    remove_graph(served)


def _handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


def _body(served, out: str, word: str = "Hello there.", src: str = "src.mp4", **extra) -> dict:
    bucket = served["bucket"]
    return {"word": word, "user_video_gs": f"gs://{bucket}/{src}", "output_video_gs": f"gs://{bucket}/{out}",
            "tts_lang": "en", **extra}


def _exists(served, name: str) -> bool:
    return served["gcs"].bucket(served["bucket"]).blob(name).exists()


def _post(served, body: dict, **kwargs) -> tuple[httpx.Response, float]:
    t = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{served['port']}/api/v1/lip-video", json=body, headers=AUTH,
                   timeout=CLIENT_TIMEOUT_S, **kwargs)
    return r, time.perf_counter() - t


def _clean_error(served, r: httpx.Response, status: int, code: str) -> dict:
    """The answer is a JSON error with this status and code, and shows nothing it must not."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["request_id"] == r.headers["x-request-id"]
    text = r.text
    assert "Traceback" not in text and 'File "' not in text, text
    assert TOKEN not in text
    root = str(served["root"])
    for marker in ("/tmp/", "/work/", "/home/", "site-packages", "/etc/"):
        assert marker not in text.replace(root, "<root>"), text
    if status == 503:
        assert int(r.headers["retry-after"]) > 0
    return err


def _stage_state(deployment: str, timeout_s: float = 30) -> dict:
    if deployment == "Ingress":
        return _handle("Ingress").load.remote().result(timeout_s=timeout_s)
    return _handle(deployment).describe.remote().result(timeout_s=timeout_s)


def _wait_until_in(deployment: str, step: str, timeout_s: float) -> int:
    """Poll the stage's replica until it is running `step` for a request; its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _stage_state(deployment)
        if state["in_flight"].get(step):
            return state["replica_pid"]
        time.sleep(0.02)
    raise AssertionError(f"{deployment} never ran {step} within {timeout_s} s")


def _recover(served, killed_at: float, deployment: str, old_pid: int, label: str, out: str) -> dict:
    """Wait for the replacement replica to answer, then /health must be 200 and a real request
    must succeed. Seconds from the kill to each."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError

    deadline = killed_at + RECOVERY_LIMIT_S
    back_at = None
    method = "load" if deployment == "Ingress" else "describe"
    while time.monotonic() < deadline:
        asked = getattr(_handle(deployment), method).remote()
        try:
            if asked.result(timeout_s=2)["replica_pid"] != old_pid:
                back_at = time.monotonic()
                break
        except (TimeoutError, RayError, BackPressureError):  # no replica yet, or the dead one answered
            # withdrawn, or every unanswered ask would wait in the handle's queue (a replica start
            # with its warm-up outlasts the queue's 16 places)
            asked.cancel()
            time.sleep(0.5)
    assert back_at is not None, f"{label}: no new {deployment} replica within {RECOVERY_LIMIT_S} s"
    health = httpx.get(f"http://127.0.0.1:{served['port']}/health", timeout=60)
    assert health.status_code == 200, health.text
    r, seconds = _post(served, _body(served, out, word=f"Back after {label}."))
    assert r.status_code == 200, r.text
    figures = {"replica_s": back_at - killed_at, "first_200_s": time.monotonic() - killed_at, "request_s": seconds}
    MEASURED[label] = (f"new replica answering {figures['replica_s']:.1f} s after the kill; a request sent "
                       f"then succeeded {figures['first_200_s']:.1f} s after it (the request took {seconds:.1f} s)")
    return figures


# ------------------------------------------------------------------ the edge


def test_a_body_over_the_limit_is_413_and_never_parsed(served):
    big = {"word": "x", "user_video_gs": "gs://b/a.mp4", "output_video_gs": "gs://b/o.mp4",
           "options": {"padding": "y" * 1_000_000}}
    r = served["client"].post("/api/v1/lip-video", content=json.dumps(big).encode(),
                              headers={"content-type": "application/json"})
    err = _clean_error(served, r, 413, "body_too_large")
    assert err["field"] == "body"


def test_every_route_that_reads_or_works_wants_the_token(served):
    """Only /health and the static pages a browser opens by address (which cannot carry a header)
    answer without the token; every route that reads data or runs work, and unknown ones, say 401."""
    base = f"http://127.0.0.1:{served['port']}"
    for method, path in (("POST", "/api/v1/preload-models"), ("GET", "/api/v1/models"),
                         ("POST", "/api/v1/lip-video"), ("POST", "/api/v1/lip-video-optimized"),
                         ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs/0123"), ("POST", "/api/v1/uploads"),
                         ("GET", "/api/v1/media?uri=out/x.mp4"), ("GET", "/api/v1/languages"),
                         ("GET", "/no/such/route")):
        r = httpx.request(method, base + path, timeout=30)
        _clean_error(served, r, 401, "unauthorized")
    for path in ("/health", "/", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(base + path, timeout=30).status_code == 200, path


def test_a_path_outside_the_storage_root_is_refused_without_showing_it(served):
    """A symlink under the root that points out of it: 403, and the body shows neither where it
    points nor where the root is."""
    link = served["root"] / "escape.mp4"
    if not link.exists():
        link.symlink_to("/etc/hostname")
    for src in ("escape.mp4", "../../etc/passwd", "/etc/passwd"):
        body = {"word": "Hi.", "user_video_gs": src, "output_video_gs": "out/escape.mp4", "tts_lang": "en"}
        r = served["client"].post("/api/v1/lip-video", json=body)
        _clean_error(served, r, 403, "path_outside_root")
        assert "hostname" not in r.text and "passwd" not in r.text.replace(src, "")
    assert not (served["root"] / "out" / "escape.mp4").exists()


# ------------------------------------------------------------------ storage failing mid-request


def _copy_source(served, name: str) -> None:
    bucket = served["gcs"].bucket(served["bucket"])
    if not bucket.blob(name).exists():
        bucket.blob(name).upload_from_string(bucket.blob("src.mp4").download_as_bytes())


def test_storage_stopped_during_the_download(served):
    storage, src, out = served["storage"], "dl-fault.mp4", "out/dl-fault.mp4"
    _copy_source(served, src)
    fired = storage.link.arm(f"/download/storage/v1/b/{served['bucket']}/o/{src}".encode(), storage.emulator.stop,
                             response_bytes=20_000)
    try:
        r, seconds = _post(served, _body(served, out, word="Storage goes away while reading.", src=src))
    finally:
        storage.link.disarm()
        if not storage.emulator.running:
            storage.emulator.start()
    assert fired.is_set(), (r.status_code, r.text)
    err = _clean_error(served, r, 502, "storage_unavailable")
    assert "storage" in err["message"]
    assert seconds < REQUEST_TIMEOUT_S / 2, seconds
    assert not _exists(served, out)
    r, _ = _post(served, _body(served, out, word="Storage goes away while reading.", src=src))
    assert r.status_code == 200, r.text  # storage is back: the same request works
    assert _exists(served, out)


def test_storage_stopped_during_the_upload(served):
    storage, out = served["storage"], "out/ul-fault.mp4"
    fired = storage.link.arm(f"/upload/storage/v1/b/{served['bucket']}/o".encode(), storage.emulator.stop,
                             request_bytes=4096)
    try:
        r, seconds = _post(served, _body(served, out, word="Storage goes away while writing."))
    finally:
        storage.link.disarm()
        if not storage.emulator.running:
            storage.emulator.start()
    assert fired.is_set(), "the upload never started"
    err = _clean_error(served, r, 502, "storage_unavailable")
    assert "storage" in err["message"]
    names = [b.name for b in served["gcs"].list_blobs(served["bucket"], prefix="out/ul-fault")]
    assert names == [], f"nothing half-written: {names}"
    r, _ = _post(served, _body(served, out, word="Storage goes away while writing."))
    assert r.status_code == 200, r.text
    data = served["gcs"].bucket(served["bucket"]).blob(out).download_as_bytes()
    assert media.probe(data).has_audio  # the whole video, once storage is back


def test_hanging_storage_is_a_502_in_bounded_time(served):
    storage = served["storage"]
    storage.emulator.freeze()
    try:
        r, seconds = _post(served, _body(served, "out/hang.mp4", word="Storage hangs."))
    finally:
        storage.emulator.thaw()
    _clean_error(served, r, 502, "storage_unavailable")
    # google's retry budget is storage_timeout_s per call: a handful of them at most, never the
    # whole request timeout
    assert seconds < 6 * STORAGE_TIMEOUT_S + 10, seconds
    MEASURED["storage hanging"] = f"502 after {seconds:.1f} s (storage_timeout_s {STORAGE_TIMEOUT_S:g})"
    assert not _exists(served, "out/hang.mp4")


# ------------------------------------------------------------------ replicas killed


KILLS = [("LipSyncer", "lipsync"), ("VoiceConverter", "voice"), ("SpeechSynthesizer", "tts")]


@pytest.mark.parametrize("deployment, step", KILLS, ids=[d for d, _ in KILLS])
def test_a_stage_replica_killed_mid_request(served, deployment, step):
    out = f"out/kill-{deployment}.mp4"
    with cf.ThreadPoolExecutor(1) as pool:
        # a text never said before: the speech stage cannot answer from its cache
        pending = pool.submit(_post, served, _body(served, out, word=f"{deployment} goes away mid sentence."))
        pid = _wait_until_in(deployment, step, timeout_s=REQUEST_TIMEOUT_S)
        os.kill(pid, signal.SIGKILL)  # our own test cluster's replica process
        killed_at = time.monotonic()
        r, _ = pending.result()
    answered_s = time.monotonic() - killed_at
    err = _clean_error(served, r, 503, "stage_unavailable")
    assert err["stage"] == deployment and deployment in err["message"]
    assert answered_s < 60, f"the caller waited {answered_s:.1f} s after the replica died"
    assert not _exists(served, out)
    _recover(served, killed_at, deployment, pid, f"{deployment} killed mid-{step}", f"out/after-kill-{deployment}.mp4")


def _request_failures(served, code: str) -> float:
    """lipserve_stage_failures{stage="request", code=...} summed over the ingress replicas, as exported."""
    text = httpx.get(served["metrics_url"], timeout=10).text
    pattern = r'^ray_lipserve_stage_failures_total\{([^}]*)\} (\S+)'
    return sum(float(value) for labels, value in re.findall(pattern, text, re.M)
               if 'stage="request"' in labels and f'code="{code}"' in labels)


def test_a_streamed_answer_cut_off_after_its_first_byte_is_incomplete_counted_and_writes_nothing(served):
    """The LipSyncer replica killed once the first fragment has reached the caller: the body ends
    without its final chunk (the client sees an incomplete transfer, not a clean end), the failure
    is counted with its code, and nothing is written."""
    out = "out/stream-cut.mp4"
    before = _request_failures(served, "stage_unavailable")
    body = _body(served, out, word="This stream is cut off part way through.")
    received, pid, killed_at = 0, None, None
    with pytest.raises(httpx.RemoteProtocolError):  # "peer closed connection without sending complete message body"
        with httpx.stream("POST", f"http://127.0.0.1:{served['port']}/api/v1/lip-video/stream", json=body,
                          headers=AUTH, timeout=CLIENT_TIMEOUT_S) as r:
            assert r.status_code == 200, r.read()
            for chunk in r.iter_raw():
                received += len(chunk)
                if pid is None and b"moof" in chunk:  # a fragment is out: the answer has started playing
                    pid = _stage_state("LipSyncer")["replica_pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
    assert pid is not None, "no fragment arrived before the end"
    cut_s = time.monotonic() - killed_at
    assert not _exists(served, out)
    deadline = time.monotonic() + 30
    while _request_failures(served, "stage_unavailable") <= before:  # Ray flushes metrics each second
        assert time.monotonic() < deadline, "the cut-off stream was not counted"
        time.sleep(1)
    MEASURED["stream cut after its first byte"] = (f"{received} bytes received; the body ended incomplete "
                                                  f"{cut_s:.1f} s after the LipSyncer kill")
    _recover(served, killed_at, "LipSyncer", pid, "LipSyncer killed mid-stream", "out/after-stream-cut.mp4")


def test_the_ingress_replica_killed_between_requests(served):
    pid = _stage_state("Ingress")["replica_pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # the first caller after the kill: Serve answers it (a 503 while there is no ingress, or the
    # new ingress's answer), at once or once the replacement is up; never a hang, never a 500
    r, seconds = _post(served, _body(served, "out/after-ingress-kill.mp4", word="Is anyone there?"))
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert int(r.headers.get("retry-after", "0")) > 0, r.headers
        assert not _exists(served, "out/after-ingress-kill.mp4")
    MEASURED["first request after the ingress kill"] = f"HTTP {r.status_code} after {seconds:.1f} s"
    _recover(served, killed_at, "Ingress", pid, "Ingress killed between requests", "out/after-ingress-kill-2.mp4")


# ------------------------------------------------------------------ a redeploy under traffic


def test_a_redeploy_under_traffic_finishes_or_refuses_every_request(served):
    """A new user_config applied while requests run (the controller call of `serve deploy`):
    Serve reconfigures the running replicas in place; every request in flight answers."""
    changed = copy.deepcopy(served["config"])
    deployments = {d["name"]: d for d in changed["applications"][0]["deployments"]}
    deployments["Ingress"]["user_config"]["max_waiting"] = 2
    lipsync = deployments["LipSyncer"]["user_config"]
    # LipSyncer's own settings: what its requests get when they leave face_mode and pads unset
    lipsync["settings"] = {**(lipsync.get("settings") or {}), "pads": [0, 12, 0, 0], "face_mode": "static"}
    pids = {name: _stage_state(name)["replica_pid"] for name in deployments}

    with cf.ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(_post, served, _body(served, f"out/redeploy-{i}.mp4", word=f"Redeploy number {i}."))
                   for i in range(2)]
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while _stage_state("Ingress")["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stage_state("Ingress")["running"] == 1, "the redeploy must meet a request in flight"
        redeploy_s = served["apply"](changed)
        answers = [f.result() for f in pending]
    statuses = [r.status_code for r, _ in answers]
    for i, (r, _) in enumerate(answers):
        if r.status_code == 200:
            assert _exists(served, f"out/redeploy-{i}.mp4")
        else:
            _clean_error(served, r, 503, r.json()["error"]["code"])
            assert not _exists(served, f"out/redeploy-{i}.mp4")
    assert all(s in (200, 503) for s in statuses), statuses
    # the new config is in force, in the replicas that were already running
    assert _stage_state("Ingress")["max_waiting"] == 2
    assert _stage_state("LipSyncer")["settings_overrides"]["pads"] == [0, 12, 0, 0]
    assert {name: _stage_state(name)["replica_pid"] for name in deployments} == pids
    r, _ = _post(served, _body(served, "out/after-redeploy.mp4", word="After the redeploy."))
    assert r.status_code == 200, r.text
    assert r.json()["face_mode"] == "static"  # the LipSyncer's user_config reached the request
    MEASURED["redeploy under traffic"] = (f"a new user_config in force {redeploy_s:.1f} s after `serve run "
                                          f"--non-blocking`; the 2 requests in flight answered {statuses}")
