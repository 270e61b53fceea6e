"""The Ray Serve graph on a real local Ray, through real HTTP.

One deployment of the whole app (the session's `served`, tests/fixtures/serve.py, shared with
test_serve_faults.py) with the GPU config's fractions (0.5 and 1 on two logical GPUs;
torch.cuda is unavailable, so the stages run on CPU) and synthetic weights; a GCS emulator is the
storage. Every test talks to it over HTTP on 127.0.0.1.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lipserve import media
from lipserve.pipeline import STAGES
from tests.fixtures.serve import AUTH, CLIENT_TIMEOUT_S, MAX_TEXT, REQUEST_TIMEOUT_S, TOKEN

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _body(bucket: str, out: str, word: str = "Hello there.", src: str = "src.mp4", **extra) -> dict:
    return {"word": word, "user_video_gs": f"gs://{bucket}/{src}", "output_video_gs": f"gs://{bucket}/{out}",
            "tts_lang": "en", **extra}


def _exists(served, uri: str) -> bool:
    bucket, _, name = uri[len("gs://"):].partition("/")
    return served["gcs"].bucket(bucket).blob(name).exists()


def _first_request(served) -> dict:
    """The first real request (shared by the tests that inspect it)."""
    if "first" not in served["results"]:
        r = served["client"].post("/api/v1/lip-video", json=_body(served["bucket"], "out/first.mp4"),
                                  headers={"X-Request-ID": "first-request"})
        assert r.status_code == 200, r.text
        served["results"]["first"] = r
    return served["results"]["first"]


def test_gcs_to_gcs_request_gives_a_valid_mp4(served):
    r = _first_request(served)
    body = r.json()
    assert r.headers["x-request-id"] == "first-request" == body["request_id"]
    assert body["output_video_gs"] == f"gs://{served['bucket']}/out/first.mp4"
    assert set(STAGES) | {"total"} <= set(body["step_times"]), body["step_times"]
    assert all(v >= 0 for v in body["step_times"].values())
    assert body["synthetic_weights"] is True and "SYNTHETIC" in body["warnings"][0]
    assert {"tts", "voice", "lipsync", "faces"} <= set(body["engines"])

    data = served["gcs"].bucket(served["bucket"]).blob("out/first.mp4").download_as_bytes()
    info = media.probe(data)
    assert info.has_audio and info.video_codec == "h264"
    audio = media.read_audio(data, 16000)
    speech_s = audio.size / 16000
    frame = 1.0 / info.fps
    assert abs(info.duration - speech_s) <= frame + 0.03, (info.duration, speech_s)
    assert abs(body["duration_s"] - speech_s) <= frame + 0.03
    assert len(media.decode_frames(data)) >= 1


def test_audio_and_video_branches_overlap(served):
    spans = _first_request(served).json()["stage_spans"]
    tts, voice, faces, lipsync = spans["tts"], spans["voice"], spans["faces"], spans["lipsync"]
    audio_branch = (tts[0], voice[1])
    # face finding ran while the audio branch was running, not after it
    assert faces[0] < audio_branch[1] and faces[1] > audio_branch[0], spans
    assert faces[0] < voice[0], spans
    # lip sync waited for both
    assert lipsync[0] >= max(voice[1], faces[1]) - 0.01, spans


def test_second_request_with_same_video_reuses_faces_and_speaker(served):
    _first_request(served)
    r = served["client"].post("/api/v1/lip-video-optimized",
                              json=_body(served["bucket"], "out/second.mp4", word="Good morning."))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"]["face_boxes"] is True
    assert body["cache"]["speaker_embedding"] is True
    assert _exists(served, body["output_video_gs"])


def test_silent_video_with_a_separate_reference_voice_works(served):
    """No voice in the video, but options.reference_audio names one: the voice comes from there."""
    ref = f"gs://{served['bucket']}/src.mp4"
    r = served["client"].post("/api/v1/lip-video", json=_body(served["bucket"], "out/ref.mp4", src="silent.mp4",
                                                               options={"reference_audio": ref}))
    assert r.status_code == 200, r.text
    assert _exists(served, r.json()["output_video_gs"])


BAD_INPUTS = [
    ("empty_word", dict(word="   "), 400, "empty_text"),
    ("text_over_limit", dict(word="a" * (MAX_TEXT + 1)), 413, "text_too_long"),
    ("unsupported_language", dict(tts_lang="xx"), 400, "unsupported_language"),
    ("malformed_uri", dict(user_video_gs="gs:///nobucket"), 400, "invalid_uri"),
    ("missing_source", dict(src="does-not-exist.mp4"), 404, "source_not_found"),
    ("bucket_not_allowed", dict(user_video_gs="gs://{other}/src.mp4"), 403, "bucket_not_allowed"),
    ("not_a_video", dict(src="notvideo.mp4"), 422, "invalid_video"),
    ("no_face", dict(src="noface.mp4"), 422, "no_face_found"),
    ("no_voice", dict(src="silent.mp4"), 422, "no_voice_found"),
    ("source_too_large", dict(src="huge.mp4"), 413, "input_too_large"),
    ("source_too_long", dict(src="long.mp4"), 413, "video_too_long"),
]


@pytest.mark.parametrize("case, change, status, code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_is_written(served, case, change, status, code):
    change = {k: v.format(other=served["other"]) if isinstance(v, str) else v for k, v in change.items()}
    src = change.pop("src", "src.mp4")
    out = f"out/bad-{case}.mp4"
    body = _body(served["bucket"], out, src=src)
    body.update(change)
    r = served["client"].post("/api/v1/lip-video", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["request_id"] == r.headers["x-request-id"]
    assert not _exists(served, f"gs://{served['bucket']}/{out}")


def test_existing_output_is_409_and_left_alone(served):
    r = served["client"].post("/api/v1/lip-video", json=_body(served["bucket"], "exists.mp4"))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "output_exists"
    assert served["gcs"].bucket(served["bucket"]).blob("exists.mp4").download_as_bytes() == b"already here"


def test_body_that_is_not_json_is_400(served):
    r = served["client"].post("/api/v1/lip-video", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_field"


def test_bearer_token_is_required_when_configured(served):
    base = f"http://127.0.0.1:{served['port']}"
    body = _body(served["bucket"], "out/noauth.mp4")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{base}/api/v1/lip-video", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{base}/api/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # load balancers need no token
    assert not _exists(served, f"gs://{served['bucket']}/out/noauth.mp4")


def test_health_models_and_preload(served):
    client = served["client"]
    health = client.get("/health")
    assert health.status_code == 200, health.text
    stages = health.json()["stages"]
    assert set(stages) == {"tts", "voice", "lipsync"}
    for name, desc in stages.items():
        assert desc["up"] and desc["model_loaded"], (name, desc)
    # the GPU fractions were scheduled on the logical GPUs, and the stages fell back to CPU
    assert stages["voice"]["device"] == "cpu" and stages["lipsync"]["device"] == "cpu"
    assert len(stages["voice"]["gpu_ids"]) == 1 and len(stages["lipsync"]["gpu_ids"]) == 1
    assert stages["tts"]["gpu_ids"] == []
    models = client.get("/api/v1/models").json()
    assert models["synthetic_weights"] is True
    assert models["stages"]["lipsync"]["checkpoint"]
    pids = None
    for _ in range(2):  # idempotent: the same replicas answer, nothing reloads
        r = client.post("/api/v1/preload-models")
        assert r.status_code == 200, r.text
        now = {k: v["replica_pid"] for k, v in r.json()["stages"].items()}
        assert pids in (None, now)
        pids = now


def test_overload_burst_gets_503_with_retry_after_and_nothing_hangs(served):
    """10 requests at once against max_active=1/max_waiting=1 (gate) and
    max_ongoing_requests=4/max_queued_requests=2 (Serve): the overflow is refused at once."""
    url = f"http://127.0.0.1:{served['port']}/api/v1/lip-video"
    bucket = served["bucket"]

    def send(i: int):
        # the no-voice clip: each admitted request runs TTS, then fails fast in the voice stage
        body = _body(bucket, f"out/burst-{i}.mp4", word=f"Burst number {i}.", src="silent.mp4")
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=CLIENT_TIMEOUT_S, headers=AUTH)
        return r, time.perf_counter() - t

    with cf.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(send, range(10)))
    statuses = [r.status_code for r, _ in results]
    seen = [(r.status_code, r.headers.get("retry-after"), r.text[:60]) for r, _ in results]
    assert set(statuses) <= {422, 503}, seen
    refused = [r for r, _ in results if r.status_code == 503]
    assert refused, seen
    for r in refused:
        assert int(r.headers["retry-after"]) > 0
    assert any(r.headers.get("content-type", "").startswith("application/json")
               and r.json()["error"]["code"] == "overloaded" for r in refused), [r.text for r in refused]
    assert all(seconds < REQUEST_TIMEOUT_S + 5 for _, seconds in results)


def test_stage_latency_metric_is_on_prometheus_export(served):
    _first_request(served)
    wanted = {"tts", "voice", "faces", "lipsync", "request"}  # the stages, and the whole request (ingress)
    deadline = time.time() + 30
    seen: set[str] = set()
    while time.time() < deadline:
        text = httpx.get(served["metrics_url"], timeout=10).text
        seen = set(re.findall(r'^ray_lipserve_stage_latency_seconds_count\{[^}]*stage="(\w+)"', text, re.M))
        failures = re.findall(r'^ray_lipserve_stage_failures_total\{[^}]*code="(\w+)"', text, re.M)
        if wanted <= seen and failures:
            break
        time.sleep(1)
    assert wanted <= seen, seen
    assert 'engine="piper"' in text
    assert failures, "no failure counter exported"


@pytest.mark.slow
def test_serve_build_reproduces_the_config_shape(tmp_path):
    out = tmp_path / "built.yaml"
    serve_cli = Path(sys.executable).with_name("serve")
    subprocess.run([str(serve_cli), "build", "pipeline_graph:app", "-o", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    built = yaml.safe_load(out.read_text())
    ours = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    built_app, our_app = built["applications"][0], ours["applications"][0]
    assert built_app["import_path"] == our_app["import_path"] == "pipeline_graph:app"
    built_deps = {d["name"]: d for d in built_app["deployments"]}
    our_deps = {d["name"]: d for d in our_app["deployments"]}
    assert set(built_deps) == set(our_deps) == {"Ingress", "SpeechSynthesizer", "VoiceConverter", "LipSyncer"}
    for name, ours_d in our_deps.items():
        built_d = built_deps[name]
        # the decorators carry the GPU config's resources and queue limits
        for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                    "graceful_shutdown_timeout_s"):
            assert float(built_d[key]) == float(ours_d[key]), (name, key)
        for key in ("num_cpus", "num_gpus"):
            assert float(built_d["ray_actor_options"][key]) == float(ours_d["ray_actor_options"][key]), (name, key)
        # every option Serve writes for the code is also set in the config file
        assert set(built_d) <= set(ours_d), (name, set(built_d) - set(ours_d))
    assert our_deps["VoiceConverter"]["ray_actor_options"]["num_gpus"] == 0.5
    assert our_deps["LipSyncer"]["ray_actor_options"]["num_gpus"] == 1
