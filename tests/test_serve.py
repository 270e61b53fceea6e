"""The Ray Serve graph on a real local Ray, through real HTTP.

One deployment of the whole app (the session's `served`, tests/fixtures/serve.py, shared with
test_serve_faults.py) with the GPU config's fractions (0.5 and 1 on two logical GPUs;
torch.cuda is unavailable, so the stages run on CPU) and synthetic weights; a GCS emulator is the
storage. Every test talks to it over HTTP on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from devtools import testmedia
from lipserve import media
from lipserve.answer import STAGES
from tests.fixtures.browser import chromium, wait_for
from tests.fixtures.serve import (AUTH, CLIENT_TIMEOUT_S, JOB_LOST_AFTER_S, MAX_INPUT_BYTES, MAX_TEXT, MAX_VIDEO_S,
                                  MEASURED, REQUEST_TIMEOUT_S, TOKEN)

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


# ---------------------------------------------------------------- the contract in the schema (issue 14)

def test_served_schema_is_the_one_the_code_publishes(served):
    """tests/test_serve_units.py checks that schema against the models; here: it is what is served,
    with /docs rendering it from the package (the browser test looks at it)."""
    from deployments.ingress import app

    r = httpx.get(f"http://127.0.0.1:{served['port']}/openapi.json", timeout=30)  # public, like /docs
    assert r.status_code == 200, r.text
    served_spec, ours = r.json(), json.loads(json.dumps(app.openapi()))
    differing = [(path, method, key) for path in sorted(set(served_spec["paths"]) | set(ours["paths"]))
                 for method in sorted(set(served_spec["paths"].get(path, {})) | set(ours["paths"].get(path, {})))
                 for key in sorted(set(served_spec["paths"].get(path, {}).get(method, {}))
                                   | set(ours["paths"].get(path, {}).get(method, {})))
                 if served_spec["paths"].get(path, {}).get(method, {}).get(key)
                 != ours["paths"].get(path, {}).get(method, {}).get(key)]
    def answers(spec, path, method):
        return spec["paths"].get(path, {}).get(method, {}).get("responses", {})

    statuses = [(path, method, status, answers(served_spec, path, method).get(status), answers(ours, path, method).get(status))
                for path, method, key in differing if key == "responses"
                for status in set(answers(served_spec, path, method)) | set(answers(ours, path, method))
                if answers(served_spec, path, method).get(status) != answers(ours, path, method).get(status)]
    assert not differing, (statuses[:3], differing[:5])
    assert served_spec == ours
    docs = httpx.get(f"http://127.0.0.1:{served['port']}/docs", timeout=30)
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text


def test_published_example_request_is_accepted(served):
    """The example /docs shows, sent as published (only the bucket is the test's own)."""
    spec = httpx.get(f"http://127.0.0.1:{served['port']}/openapi.json", timeout=30).json()
    example = spec["components"]["schemas"]["LipVideoRequest"]["examples"][0]
    bucket_of = lambda uri: uri[len("gs://"):].split("/", 1)[0]  # noqa: E731
    assert bucket_of(example["user_video_gs"]) == bucket_of(example["output_video_gs"])
    body = json.loads(json.dumps(example).replace(f"gs://{bucket_of(example['user_video_gs'])}/",
                                                  f"gs://{served['bucket']}/"))
    source = body["user_video_gs"][len(f"gs://{served['bucket']}/"):]
    served["gcs"].bucket(served["bucket"]).blob(source).upload_from_string(
        served["gcs"].bucket(served["bucket"]).blob("src.mp4").download_as_bytes())
    r = served["client"].post("/api/v1/lip-video", json=body)
    assert r.status_code == 200, r.text
    assert _exists(served, r.json()["output_video_gs"])


def test_invalid_bodies_get_lipserves_error_body_not_fastapis(served):
    url = f"http://127.0.0.1:{served['port']}"
    good = _body(served["bucket"], "exists.mp4")  # a valid body that pre-flight refuses (409) on every route
    cases = [  # (content, headers, status, code, field, message)
        (b"{not json", {"content-type": "application/json"}, 400, "invalid_field", "body", "the body must be a JSON object"),
        (b"", {"content-type": "application/json"}, 400, "invalid_field", "body", "the body must be a JSON object"),
        (b'["a", "list"]', {"content-type": "application/json"}, 400, "invalid_field", "body", None),
        (json.dumps({k: v for k, v in good.items() if k != "output_video_gs"}).encode(), {}, 400, "invalid_field",
         "output_video_gs", "output_video_gs: Field required"),
        (json.dumps({**good, "colour": "red"}).encode(), {}, 400, "invalid_field", "colour", None),
        (json.dumps({**good, "options": {"pads": [0, -1, 0, 0]}}).encode(), {}, 400, "invalid_field", "options.pads", None),
        # the body was always read as JSON whatever the Content-Type; it still is (it gets as far as pre-flight)
        (json.dumps(good).encode(), {"content-type": "application/x-www-form-urlencoded"}, 409, "output_exists", None, None),
        (json.dumps(good).encode(), {"content-type": "text/plain"}, 409, "output_exists", None, None),
    ]
    for path in ("/api/v1/lip-video", "/api/v1/lip-video-optimized", "/api/v1/jobs"):
        for content, headers, status, code, field, message in cases:
            r = httpx.post(url + path, content=content, headers={**AUTH, **headers}, timeout=60)
            assert r.status_code == status, (path, content[:40], r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["request_id"] == r.headers["x-request-id"], (path, err)
            assert field is None or err["field"] == field, (path, err)
            assert message is None or err["message"] == message, (path, err)
        # the token is checked before the body: a caller without it learns nothing about the body
        r = httpx.post(url + path, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


# ---------------------------------------------------------------- the client and jobs (issue 14)

LONG_WORDS = "This sentence is long on purpose, so the job runs longer than the timeout."


def _long_job(served, name: str):
    """A job whose work outlasts a 5 s client timeout on this CPU box: a source seen for the first
    time (no cached faces or speaker) and a long sentence."""
    from lipserve.client import LipserveClient

    clip = testmedia.astronaut_clip(seconds=5.0, fps=25, size=(320, 240), audio="speechlike")
    served["gcs"].bucket(served["bucket"]).blob(f"{name}.mp4").upload_from_string(clip)
    client = LipserveClient(f"http://127.0.0.1:{served['port']}", token=TOKEN, timeout=5.0)
    job = client.submit_job(LONG_WORDS, f"gs://{served['bucket']}/{name}.mp4",
                            f"gs://{served['bucket']}/out/{name}.mp4", "en", {"face_mode": "track"})
    return client, job


def test_a_job_outlives_a_5s_client_timeout_and_is_fetched_afterwards(served):
    from lipserve.client import AsyncLipserveClient

    client, job = _long_job(served, "job-long")
    assert job.status == "queued" and len(job.job_id) == 32
    seen = []
    with client:  # every call below has the same 5 s timeout: none waits for the work
        result = client.wait_job(job.job_id, poll_s=0.5, timeout_s=400,
                                 on_status=lambda s: seen.append((s.status, s.stage)))
    assert result.step_times["total"] > 5.0, "premise: the work outlasted the client's timeout"
    assert any(status == "running" and stage in STAGES for status, stage in seen), seen
    assert result.synthetic_weights and _exists(served, result.output_video_gs)

    async def fetch_again():
        async with AsyncLipserveClient(f"http://127.0.0.1:{served['port']}", token=TOKEN, timeout=5.0) as again:
            return await again.job(job.job_id)

    later = asyncio.run(fetch_again())
    assert later.status == "done" and later.result == result
    assert later.expires_at > later.finished_at and set(later.stages) >= {"tts", "voice", "faces", "lipsync"}
    assert all(p.state == "done" for p in later.stages.values())
    served["results"]["job"] = later


def test_a_failing_job_ends_with_the_routes_error_body(served):
    from lipserve.client import LipserveClient, LipserveHTTPError

    with LipserveClient(f"http://127.0.0.1:{served['port']}", token=TOKEN, timeout=30) as client:
        job = client.submit_job("No voice here.", f"gs://{served['bucket']}/silent.mp4",
                                f"gs://{served['bucket']}/out/job-silent.mp4")
        with pytest.raises(LipserveHTTPError) as info:
            client.wait_job(job.job_id, poll_s=0.5, timeout_s=300)
        assert (info.value.status, info.value.code) == (422, "no_voice_found")
        failed = client.job(job.job_id)
        assert failed.status == "failed" and failed.http_status == 422 and failed.error.request_id
        # refused before any work: the same statuses as the synchronous route, and no job
        with pytest.raises(LipserveHTTPError) as info:
            client.submit_job("Hi.", f"gs://{served['bucket']}/src.mp4", f"gs://{served['bucket']}/exists.mp4")
        assert (info.value.status, info.value.code) == (409, "output_exists")
        with pytest.raises(LipserveHTTPError) as info:
            client.job("0" * 32)
        assert (info.value.status, info.value.code) == (404, "job_not_found")
    assert not _exists(served, f"gs://{served['bucket']}/out/job-silent.mp4")


def test_lipserve_call_uses_the_client_on_the_synchronous_route(served):
    """`lipserve call` (LipserveClient.lip_video; the job methods are tested above)."""
    from lipserve.client import LipserveClient

    with LipserveClient(f"http://127.0.0.1:{served['port']}", token=TOKEN, timeout=30) as client:
        assert "en" in client.languages()["languages"] and client.health()["status"] == "ok"
    cli = [str(Path(sys.executable).with_name("lipserve")), "call", "--url", f"http://127.0.0.1:{served['port']}"]
    run = subprocess.run([*cli, "--token", TOKEN, "--video", f"gs://{served['bucket']}/src.mp4", "--text", "Good night.",
                          "--out", f"gs://{served['bucket']}/out/cli.mp4", "--json"],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout)
    assert answer["output_video_gs"] == f"gs://{served['bucket']}/out/cli.mp4" and "SYNTHETIC" in run.stderr
    assert _exists(served, answer["output_video_gs"])
    run = subprocess.run([*cli, "--token", "wrong", "--video", f"gs://{served['bucket']}/src.mp4", "--text", "Hi."],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "401 unauthorized" in run.stderr


# ---------------------------------------------------------------- the page and its routes (issue 14)

def test_upload_and_media_routes_keep_to_the_limits_and_the_storage(served):
    url = f"http://127.0.0.1:{served['port']}"
    clip = served["gcs"].bucket(served["bucket"]).blob("src.mp4").download_as_bytes()
    r = httpx.post(url + "/api/v1/uploads", content=clip, headers={**AUTH, "X-Filename": "me.mp4"}, timeout=60)
    assert r.status_code == 201, r.text
    uri = r.json()["uri"]
    assert uri.startswith("uploads/") and (served["root"] / uri).read_bytes() == clip
    r = httpx.get(url + "/api/v1/media", params={"uri": uri}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.content == clip and r.headers["content-type"] == "video/mp4"
    refusals = [
        # sent chunked (no Content-Length), so the limit is met while reading: every byte is read before
        # the 413, which the client then always gets (a declared size over the limit is refused before
        # reading; tests/test_web.py checks that rule)
        ("post", "/api/v1/uploads", {"content": iter([b"x" * (MAX_INPUT_BYTES // 3)] * 3 + [b"x" * 1024])}, AUTH,
         413, "input_too_large"),
        ("post", "/api/v1/uploads", {"content": b"not a video" * 100}, AUTH, 422, "invalid_video"),
        ("post", "/api/v1/uploads", {"content": clip}, {}, 401, "unauthorized"),
        ("get", "/api/v1/media", {"params": {"uri": uri}}, {}, 401, "unauthorized"),
        ("get", "/api/v1/media", {"params": {"uri": "../outside.mp4"}}, AUTH, 403, "path_outside_root"),
        ("get", "/api/v1/media", {"params": {"uri": f"gs://{served['other']}/src.mp4"}}, AUTH, 403, "bucket_not_allowed"),
        ("get", "/api/v1/media", {"params": {"uri": "notes.txt"}}, AUTH, 400, "invalid_uri"),
        ("get", "/api/v1/media", {}, AUTH, 400, "invalid_field"),
    ]
    for method, path, kwargs, headers, status, code in refusals:
        r = getattr(httpx, method)(url + path, headers=headers, timeout=60, **kwargs)
        assert r.status_code == status and r.json()["error"]["code"] == code, (path, r.status_code, r.text[:200])
    assert sorted(p.name for p in (served["root"] / "uploads").iterdir()) == [Path(uri).name]


def test_the_page_runs_a_request_end_to_end_in_a_real_browser(served, tmp_path):
    """Headless Chromium: load the page, pick a local file, go, watch the stages, play the result;
    then the /docs page's request schema. Screenshots go to $LIPSERVE_SCREENSHOTS (else tmp)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = Path(os.environ.get("LIPSERVE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    local_clip = tmp_path / "my selfie.mp4"
    local_clip.write_bytes(served["gcs"].bucket(served["bucket"]).blob("src.mp4").download_as_bytes())
    base = f"http://127.0.0.1:{served['port']}"
    driver = chromium()
    try:
        driver.get(base + "/")
        assert driver.title.startswith("lipserve")
        driver.find_element(By.ID, "token").send_keys(TOKEN + Keys.TAB)  # 'change' reloads the languages
        wait_for(driver, "return document.getElementById('lang').dataset.loaded === 'yes'", 60, "the language list")
        assert "en" in [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#lang option")]
        driver.find_element(By.ID, "file").send_keys(str(local_clip))
        word = driver.find_element(By.ID, "word")
        word.clear()
        word.send_keys("Hello from the browser.")
        stream = driver.find_element(By.ID, "stream")
        assert stream.is_selected(), "this Chromium has MSE for the streamed answer: the page streams by default"
        stream.click()  # this test is the job path (stages, then playback): the streamed one is the next test
        driver.find_element(By.ID, "go").click()
        wait_for(driver, "return document.querySelector('#steps tr[data-stage=tts][data-state=running],"
                         "#steps tr[data-stage=tts][data-state=done]')", 120, "the tts stage to show")
        state = wait_for(driver, "const s = document.getElementById('status').dataset.state;"
                                 "return s === 'done' || s === 'failed' ? s : null", 400, "the job to finish")
        status_text = driver.find_element(By.ID, "status").text
        assert state == "done", status_text
        video = wait_for(driver, "const v = document.getElementById('result');"
                                 "return v.readyState >= 2 ? {ready: v.readyState, duration: v.duration,"
                                 " src: v.currentSrc, width: v.videoWidth, error: v.error && v.error.code} : null",
                         60, "the video to load")
        assert video["src"].startswith("blob:") and video["error"] is None and video["width"] == 320, video
        assert 0.5 < video["duration"] < MAX_VIDEO_S, video
        played = driver.execute_async_script(
            "const done = arguments[arguments.length - 1]; const v = document.getElementById('result');"
            "v.muted = true; v.play().then(() => setTimeout(() => { v.pause(); done(v.currentTime); }, 700),"
            " (e) => done('play failed: ' + e));")
        assert isinstance(played, (int, float)) and played > 0, played
        driver.execute_script("document.getElementById('result').currentTime = 0.5")
        time.sleep(0.5)
        stages = {row.get_attribute("data-stage"): row.get_attribute("data-state")
                  for row in driver.find_elements(By.CSS_SELECTOR, "#steps tr")}
        assert all(stages[s] == "done" for s in ("send", "download", "tts", "faces", "voice", "lipsync", "upload")), stages
        assert "SYNTHETIC" in driver.find_element(By.ID, "synthetic").text
        driver.save_screenshot(str(shots / "page-done.png"))
        uploads = list((served["root"] / "uploads").iterdir())
        assert uploads and all("selfie" not in p.name for p in uploads)  # generated names only

        driver.get(base + "/docs")
        wait_for(driver, "return document.querySelector('#operations-default-lip_video_api_v1_lip_video_post')",
                 60, "Swagger UI to render (from the package, no CDN)")
        driver.find_element(By.CSS_SELECTOR, "#operations-default-lip_video_api_v1_lip_video_post .opblock-summary").click()
        wait_for(driver, "return document.querySelector('.opblock-body .model-example')", 30, "the request body")
        schema_tab = driver.find_elements(By.XPATH, "//div[contains(@class,'opblock-body')]//button[normalize-space()='Schema']")
        assert schema_tab, "no Schema tab for the request body"
        schema_tab[0].click()
        wait_for(driver, "return document.querySelector('.opblock-body .model-box')", 30, "the request schema")
        # the model's "Collapse all" then "Expand all": every field with its description and limits
        for _ in range(2):
            driver.find_elements(By.CSS_SELECTOR, ".opblock-body .json-schema-2020-12-expand-deep-button")[0].click()
            time.sleep(0.3)
        body_text = driver.find_element(By.CSS_SELECTOR, ".opblock-body").text
        for field in ("word", "user_video_gs", "output_video_gs", "tts_lang", "options", "face_mode",
                      "max_text_chars", "413 input_too_large", "[1, 16] characters"):
            assert field in body_text, field
        driver.set_window_size(1280, 1700)
        driver.execute_script("document.querySelector('.opblock-section-request-body').scrollIntoView({block: 'start'})")
        time.sleep(0.5)
        driver.save_screenshot(str(shots / "docs-request-schema.png"))
    finally:
        driver.quit()


# long enough that the frames take seconds to render after the first fragment (about 5 s of speech)
STREAMED_SENTENCE = "The browser plays this answer while the server is still making the rest of it."
# fractions of the answer at which the page's frames are compared with the whole answer's
COMPARED_AT = (0.25, 0.75)


def _png_rgb(data_url: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_the_page_plays_the_stream_before_the_server_has_finished_and_shows_the_whole_answers_frames(served):
    """Headless Chromium, the page's default (streamed) path: the video's currentTime passes 0 before
    the fetch's reader is done, and the frames it shows at two times are the frames of the whole
    answer (POST /api/v1/lip-video, same request and seed) at those times, within codec noise."""
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    assert len(STREAMED_SENTENCE) <= MAX_TEXT
    source = f"gs://{served['bucket']}/src.mp4"
    driver = chromium()
    try:
        driver.get(f"http://127.0.0.1:{served['port']}/")
        driver.find_element(By.ID, "token").send_keys(TOKEN + Keys.TAB)
        assert driver.find_element(By.ID, "stream").is_selected()
        driver.find_element(By.ID, "src-uri").click()
        driver.find_element(By.ID, "uri").send_keys(source)
        word = driver.find_element(By.ID, "word")
        word.clear()
        word.send_keys(STREAMED_SENTENCE)
        driver.find_element(By.ID, "seed").send_keys("11")
        driver.find_element(By.ID, "go").click()
        state = wait_for(driver, "const s = document.getElementById('status').dataset.state;"
                                 "return s === 'done' || s === 'failed' ? s : null", 400, "the stream to end")
        assert state == "done", driver.find_element(By.ID, "status").text
        meta = driver.find_element(By.ID, "result-meta").text
        shown = driver.execute_script("const v = document.getElementById('result');"
                                      "return {data: Object.assign({}, v.dataset), duration: v.duration,"
                                      " width: v.videoWidth, height: v.videoHeight}")
        times = {k: float(shown["data"][k]) - float(shown["data"]["streamStartedMs"])
                 for k in ("firstFrameMs", "streamDoneMs")}
        MEASURED["page, streamed answer"] = (f"playing {times['firstFrameMs'] / 1e3:.2f} s after the request, "
                                             f"whole answer in {times['streamDoneMs'] / 1e3:.2f} s "
                                             f"({shown['duration']:.2f} s of video)")
        assert times["firstFrameMs"] < times["streamDoneMs"], times  # played while the rest was being made
        fps = 25.0  # src.mp4's rate, which the answer keeps
        wanted = [int(shown["duration"] * fps * f) for f in COMPARED_AT]
        # mid-frame times, so the seek lands inside frame i and not on its edge. `seeked` alone does not
        # say the new frame is on screen (one run drew the frame of the seek before: 43 against 3 here),
        # so each picture is drawn once the frame presented for that time has been (its mediaTime
        # within the frame), or after 5 s with the time it had (the assertion then reports it)
        captured = driver.execute_async_script(
            "const [times, frame, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];"
            "const v = document.getElementById('result'); v.pause();"
            "const canvas = document.createElement('canvas'); canvas.width = v.videoWidth;"
            " canvas.height = v.videoHeight; const out = [];"
            "const next = (i) => { if (i === times.length) { done(out); return; }"
            "  let seeked = false, shown = null, taken = false;"
            "  const take = () => { if (taken) return; taken = true;"
            "    canvas.getContext('2d').drawImage(v, 0, 0);"
            "    out.push([canvas.toDataURL('image/png'), shown]); next(i + 1); };"
            "  const onFrame = (now, meta) => { shown = meta.mediaTime;"
            "    if (Math.abs(shown - times[i]) <= frame / 2 + 1e-3) { if (seeked) take(); }"
            "    else v.requestVideoFrameCallback(onFrame); };"
            "  v.requestVideoFrameCallback(onFrame);"
            "  v.addEventListener('seeked', () => { seeked = true;"
            "    if (shown !== null && Math.abs(shown - times[i]) <= frame / 2 + 1e-3) take();"
            "    setTimeout(take, 5000); }, {once: true});"
            "  v.currentTime = times[i]; };"
            "next(0);", [(i + 0.5) / fps for i in wanted], 1 / fps)
        pictures = [picture for picture, _ in captured]
        presented = [at for _, at in captured]
    finally:
        driver.quit()

    whole = served["client"].post("/api/v1/lip-video", json=_body(
        served["bucket"], "out/browser-whole.mp4", word=STREAMED_SENTENCE, options={"seed": 11}))
    assert whole.status_code == 200, whole.text
    reference = media.decode_frames(served["gcs"].bucket(served["bucket"]).blob("out/browser-whole.mp4")
                                    .download_as_bytes())
    assert abs(len(reference) / fps - shown["duration"]) < 2 / fps  # the same speech: the same length
    # the streamed answer as the server stored it (the page named it), decoded here as the reference is
    streamed = media.decode_frames((served["root"] / meta.split(" ", 1)[0]).read_bytes())
    differences = []
    for i, picture in zip(wanted, pictures):
        frame = _png_rgb(picture).astype(np.int16)
        assert frame.shape == reference[i].shape
        same = float(np.mean(np.abs(frame - reference[i])))
        # the control: the whole answer a second away (the face moves), which the bound must exclude
        other = float(np.mean(np.abs(frame - reference[(i + int(fps)) % len(reference)])))
        decoded = float(np.mean(np.abs(frame - streamed[i])))  # the browser's decode against PyAV's, same bytes
        codec = float(np.mean(np.abs(streamed[i].astype(np.int16) - reference[i])))  # the two encodings alone
        differences.append((i, round(same, 2), round(other, 2), round(decoded, 2), round(codec, 2)))
    MEASURED["page, streamed frames vs the whole answer"] = (
        f"(frame, mean |diff| browser vs whole, vs whole a second away, browser vs PyAV on the streamed bytes, "
        f"PyAV streamed vs whole): {differences}; the browser's presented media times {presented}")
    # the bound: measured here, the two encodings (x264 zerolatency + a keyframe every 12 frames against
    # the whole answer's settings) differ by ~2.4 and Chromium's YUV->RGB by ~1.9 from PyAV's on the same
    # bytes, ~3.3 together; 6 leaves room for both, a frame a second away is ~40-50
    for i, same, other, decoded, codec in differences:
        assert same < 6.0 < other, (differences, presented)


# ---------------------------------------------------------------- last: it restarts the ingress

def _ingress_replica_actors():
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::lipserve#Ingress#")]


def test_jobs_survive_an_ingress_replica_restart(served):
    """A finished job is still readable through the replacement replica; a job that was running in
    the killed replica ends as failed with job_interrupted (503) instead of 'running' forever."""
    import ray

    finished = served["results"].get("job")
    assert finished is not None, "runs after test_a_job_outlives_a_5s_client_timeout_and_is_fetched_afterwards"
    client, running = _long_job(served, "job-killed")
    with client:
        _wait_for_job(client, running.job_id, lambda s: s.status == "running" and s.stage is not None, 120)
        (replica,) = _ingress_replica_actors()
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            replicas = _ingress_replica_actors()
            if replicas and replicas[0]["name"] != replica["name"]:
                try:
                    if served["client"].get("/health", timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:  # the proxy may drop a connection while the replica changes
                    pass
            time.sleep(1)
        else:
            raise AssertionError("no new ingress replica within 180 s")
        again = client.job(finished.job_id)
        assert again.status == "done" and again.result == finished.result
        lost = _wait_for_job(client, running.job_id, lambda s: s.status != "running", JOB_LOST_AFTER_S + 60)
    assert lost.status == "failed" and lost.http_status == 503 and lost.error.code == "job_interrupted", lost
    assert not _exists(served, f"gs://{served['bucket']}/out/job-killed.mp4")


def _wait_for_job(client, job_id: str, condition, timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.job(job_id)
        if condition(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: condition not met within {timeout_s:g}s (last: {status.status} {status.stage})")


def test_a_streamed_answer_is_fragmented_mp4_sent_in_pieces_and_stored_whole(served):
    """POST /api/v1/lip-video/stream through Serve's own streaming (the LipSyncer generator and a
    streaming response): the first piece arrives well before the last, the body is fragmented MP4,
    and the stored output is exactly what was streamed."""
    from lipserve.media.fragments import mp4_boxes

    body = _body(served["bucket"], "out/streamed.mp4", word="This answer streams as it is made.")
    pieces, arrivals = [], []
    start = time.perf_counter()
    with served["client"].stream("POST", "/api/v1/lip-video/stream", json=body,
                                 headers={"X-Request-ID": "streamed-1"}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "video/mp4" and r.headers["x-request-id"] == "streamed-1"
        assert r.headers.get("transfer-encoding") == "chunked"
        for chunk in r.iter_raw():
            pieces.append(chunk)
            arrivals.append(time.perf_counter() - start)
    data = b"".join(pieces)
    assert mp4_boxes(data)[:3] == ["ftyp", "moov", "moof"] and mp4_boxes(data).count("moof") >= 2
    assert len(pieces) >= 2 and arrivals[0] < arrivals[-1]
    info = media.probe(data)
    assert info.has_audio and len(media.decode_frames(data)) == info.n_frames
    stored = served["gcs"].bucket(served["bucket"]).blob("out/streamed.mp4").download_as_bytes()
    assert stored == data


def test_a_streamed_request_refused_before_its_first_byte_gets_the_json_error(served):
    body = _body(served["bucket"], "out/never-streamed.mp4", word="a" * (MAX_TEXT + 1))
    r = served["client"].post("/api/v1/lip-video/stream", json=body)
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "text_too_long"
    assert not _exists(served, f"gs://{served['bucket']}/out/never-streamed.mp4")


def test_lipserve_call_stream_writes_the_answer_the_server_stores(served, tmp_path):
    """`lipserve call --stream -o FILE` through Serve: FILE is the streamed answer, byte for byte the
    output the server wrote whole at its end."""
    from lipserve.media.fragments import mp4_boxes

    target = tmp_path / "streamed-by-cli.mp4"
    run = subprocess.run([str(Path(sys.executable).with_name("lipserve")), "call",
                          "--url", f"http://127.0.0.1:{served['port']}", "--token", TOKEN,
                          "--video", f"gs://{served['bucket']}/src.mp4", "--text", "Streamed to a file.",
                          "--out", f"gs://{served['bucket']}/out/cli-streamed.mp4", "--stream", "-o", str(target)],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    data = target.read_bytes()
    assert mp4_boxes(data)[:3] == ["ftyp", "moov", "moof"] and list(tmp_path.glob("*.part")) == []
    assert data == served["gcs"].bucket(served["bucket"]).blob("out/cli-streamed.mp4").download_as_bytes()
    assert "first byte after" in run.stderr and f"done: {len(data)} bytes" in run.stderr
