"""The Ray Serve graph on a real local Ray, through real HTTP.

One deployment of the whole app (module-scoped) with the GPU config's fractions (0.5 and 1 on
two logical GPUs; torch.cuda is unavailable, so the stages run on CPU) and synthetic weights;
the GCS emulator is the storage. Every test talks to it over HTTP on 127.0.0.1.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lipserve import media, testmedia
from lipserve.pipeline import STAGES
from tests.fixtures.ray import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MAX_TEXT = 80
MAX_INPUT_BYTES = 3_000_000
MAX_VIDEO_S = 6.0
REQUEST_TIMEOUT_S = 150.0
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _merge_user_config(config_path: Path, name: str, extra: dict) -> dict:
    cfg = yaml.safe_load(config_path.read_text())
    entry = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)
    return {**(entry.get("user_config") or {}), **extra}


@pytest.fixture(scope="module")
def served(ray_local, gcs_server, gcs_client, make_bucket, tmp_path_factory):
    """The app deployed from serve_config.yaml (GPU fractions kept), small limits for the tests."""
    from ray import serve

    from pipeline_graph import GPU_CONFIG, build_app

    bucket, other = make_bucket("serve"), make_bucket("other")
    root = tmp_path_factory.mktemp("serve-root")
    weights = tmp_path_factory.mktemp("no-weights")  # no checkpoints: synthetic weights
    env = {
        "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"],
        "LIPSERVE_STORAGE_ROOT": str(root),
        "LIPSERVE_ALLOWED_BUCKETS": bucket,
        "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1",
        "LIPSERVE_WEIGHTS_DIR": str(weights),
        "LIPSERVE_TTS_ORDER": "piper",
        "LIPSERVE_MAX_TEXT_CHARS": str(MAX_TEXT),
        "LIPSERVE_MAX_INPUT_BYTES": str(MAX_INPUT_BYTES),
        "LIPSERVE_MAX_VIDEO_SECONDS": str(MAX_VIDEO_S),
        "LIPSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "LIPSERVE_STORAGE_TIMEOUT_S": "10",
        "LIPSERVE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "LIPSERVE_AUTH_TOKEN": TOKEN,
    }
    one_replica = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}}
    overrides = {
        # GPU fractions stay as the config says; CPU counts shrink to fit a 2-core box
        "Ingress": {**one_replica, "ray_actor_options": {"num_cpus": 0.1},
                    # small queues, so a burst overflows (the gate answers JSON 503s first)
                    "max_ongoing_requests": 4, "max_queued_requests": 2,
                    "user_config": _merge_user_config(GPU_CONFIG, "Ingress", {"max_active": 1, "max_waiting": 1})},
        "SpeechSynthesizer": {**one_replica, "ray_actor_options": {"num_cpus": 0.2}},
        "VoiceConverter": {**one_replica, "ray_actor_options": {"num_cpus": 0.3}},
        "LipSyncer": {**one_replica, "ray_actor_options": {"num_cpus": 0.3}},
    }
    gpu_cfg = yaml.safe_load(GPU_CONFIG.read_text())
    for entry in gpu_cfg["applications"][0]["deployments"]:
        overrides[entry["name"]]["ray_actor_options"]["num_gpus"] = entry["ray_actor_options"]["num_gpus"]

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S + 20})
    t = time.perf_counter()
    serve.run(build_app(GPU_CONFIG, overrides=overrides, env=env), name="lipserve", route_prefix="/")
    deploy_s = time.perf_counter() - t

    source = testmedia.astronaut_clip(seconds=3.0, fps=25, size=(320, 240), audio="speechlike")
    blobs = {
        "src.mp4": source,
        "silent.mp4": testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio=None),
        "noface.mp4": testmedia.noface_clip(seconds=2.0, fps=25, size=(320, 240)),
        "photo.jpg": testmedia.astronaut_photo((320, 240), ".jpg"),
        "long.mp4": testmedia.astronaut_clip(seconds=MAX_VIDEO_S + 2, fps=10, size=(160, 120), audio="tone"),
        "notvideo.mp4": b"this is a text file, not a video\n" * 100,
        "huge.mp4": os.urandom(MAX_INPUT_BYTES + 1024),
        "exists.mp4": b"already here",
    }
    for name, data in blobs.items():
        gcs_client.bucket(bucket).blob(name).upload_from_string(data)
    gcs_client.bucket(other).blob("src.mp4").upload_from_string(source)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S, headers=AUTH) as client:
        yield {"client": client, "bucket": bucket, "other": other, "gcs": gcs_client, "root": root,
               "port": port, "metrics_url": ray_local["metrics_url"], "deploy_s": deploy_s, "results": {}}
    serve.delete("lipserve")


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
    assert 0 < body["step_times"]["first_frame"] < body["step_times"]["total"]
    assert body["synthetic_weights"] is True and "SYNTHETIC" in body["warnings"][0]
    assert {"tts", "voice", "lipsync", "faces"} <= set(body["engines"])
    # the voice stage says what it ran in (CPU: fp32) and how close the result is to the reference voice
    assert body["precision"]["voice"] == "fp32" and -1 <= body["voice_similarity"] <= 1

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
    # face finding (auto: detections spread over the frames the speech needs) started once TTS
    # gave the speech's length, and ran while voice conversion was running, not after it
    assert faces[0] >= tts[1] - 0.01, spans
    assert faces[0] < voice[1] and faces[1] > voice[0], spans
    # lip sync waited for both
    assert lipsync[0] >= max(voice[1], faces[1]) - 0.01, spans


def test_second_request_with_same_video_reuses_faces_and_speaker(served):
    _first_request(served)
    # a shorter sentence: its frames are all known (a longer one would detect on the new frames)
    r = served["client"].post("/api/v1/lip-video-optimized",
                              json=_body(served["bucket"], "out/second.mp4", word="Hi."))
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


def test_a_photo_with_a_separate_voice_reference_works_and_without_one_is_422(served):
    """A .jpg face + options.reference_audio: a video as long as the speech. Without a reference the
    422 says a reference is needed."""
    ref = f"gs://{served['bucket']}/src.mp4"
    r = served["client"].post("/api/v1/lip-video", json=_body(served["bucket"], "out/photo.mp4", src="photo.jpg",
                                                               options={"reference_audio": ref}))
    assert r.status_code == 200, r.text
    body = r.json()
    data = served["gcs"].bucket(served["bucket"]).blob("out/photo.mp4").download_as_bytes()
    info = media.probe(data)
    speech_s = media.read_audio(data, 16000).size / 16000
    assert info.has_audio and info.n_frames > 10 and abs(info.duration - speech_s) <= 1 / info.fps + 0.03
    assert body["frames_passed_through"] == 0 and body["precision"]["lipsync"] == "fp32"

    r = served["client"].post("/api/v1/lip-video", json=_body(served["bucket"], "out/photo-noref.mp4", src="photo.jpg"))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "no_voice_found" and "photo" in err["message"] and "reference" in err["message"]
    assert not _exists(served, f"gs://{served['bucket']}/out/photo-noref.mp4")


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
        # each replica ran its warm-up before it took traffic, and says where its start went
        assert desc["warmed_up"] and {"import", "build", "warm_up"} <= set(desc["start_seconds"]), (name, desc)
    # the GPU fractions were scheduled on the logical GPUs, and the stages fell back to CPU
    assert stages["voice"]["device"] == "cpu" and stages["lipsync"]["device"] == "cpu"
    assert len(stages["voice"]["gpu_ids"]) == 1 and len(stages["lipsync"]["gpu_ids"]) == 1
    # Ray tells each replica its GPU share; the stages cap their CUDA memory at it (a no-op on CPU)
    assert stages["voice"]["gpu_share"] == 0.5 and stages["lipsync"]["gpu_share"] == 1.0
    assert stages["lipsync"]["batching"]["merge"] is False  # auto: off on CPU
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
