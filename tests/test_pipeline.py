"""The one-process pipeline (no Ray): pre-flight rules, the orchestration end to end on local
paths with synthetic weights, and the `lipserve run` command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import testmedia
from lipserve import media
from lipserve.contract import FaceBox, LipVideoRequest, RequestOptions
from lipserve.errors import (
    AudioTooLong,
    BucketNotAllowed,
    EmptyText,
    InvalidField,
    InvalidMedia,
    InvalidURI,
    OutputExists,
    InvalidAudio,
    PathEscape,
    SourceNotFound,
    TextTooLong,
    UnsupportedLanguage,
    VideoTooLong,
)
from lipserve.checks import check_video, lipsync_options, load_given_speech, preflight
from lipserve.answer import STAGES
from lipserve.pipeline import Pipeline, new_request_id
from lipserve.settings import Settings
from lipserve.storage import Storage

LANGS = {"piper": ["en"], "espeak": ["en", "ko", "de"]}


@pytest.fixture()
def root(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "src.mp4").write_bytes(b"x")
    return tmp_path


def _request(**kw) -> LipVideoRequest:
    base = {"word": "Hello.", "user_video_gs": "in/src.mp4", "output_video_gs": "out/o.mp4"}
    base.update(kw)
    return LipVideoRequest(**base)


# ---------------------------------------------------------------- pre-flight (no models)

@pytest.mark.parametrize("change, error", [
    ({"word": "  \n "}, EmptyText),
    ({"word": "a" * 51}, TextTooLong),
    ({"tts_lang": "xx"}, UnsupportedLanguage),
    ({"user_video_gs": "s3://bucket/x.mp4"}, InvalidURI),
    ({"user_video_gs": "gs://somebucket/x.mp4"}, BucketNotAllowed),
    ({"output_video_gs": "../escape.mp4"}, PathEscape),
    ({"output_video_gs": "in/src.mp4"}, OutputExists),
    ({"options": RequestOptions(tts_engine="nosuch")}, InvalidField),
])
def test_preflight_refuses_bad_requests(root, change, error):
    settings = Settings(storage_root=root, max_text_chars=50, allowed_buckets=[])
    with pytest.raises(error):
        preflight(_request(**change), settings, Storage(settings), LANGS)


def test_preflight_accepts_language_variants_and_fills_options(root):
    settings = Settings(storage_root=root)
    pre = preflight(_request(tts_lang="en-US", word="  Hi there  "), settings, Storage(settings), LANGS)
    assert pre.text == "Hi there" and pre.language == "en-US"
    # what the request leaves unset is the lip-sync stage's to fill (LipSyncer.resolve), not the ingress's
    assert pre.lipsync == {"face_mode": None, "box": None, "pads": None, "resize_factor": None}
    pre = preflight(_request(tts_lang="ko", options=RequestOptions(tts_engine="espeak")), settings, Storage(settings), LANGS)
    assert pre.engine == "espeak"


def test_lipsync_options_box_and_overrides():
    assert lipsync_options(RequestOptions()) == {"face_mode": None, "box": None, "pads": None, "resize_factor": None}
    given = lipsync_options(RequestOptions(face_mode="track", pads=[1, 2, 3, 4], resize_factor=2))
    assert given == {"face_mode": "track", "box": None, "pads": (1, 2, 3, 4), "resize_factor": 2}
    boxed = lipsync_options(RequestOptions(box=FaceBox(x1=1, y1=2, x2=30, y2=40), resize_factor=3))
    assert boxed["face_mode"] == "box" and boxed["box"] == (1, 2, 30, 40) and boxed["resize_factor"] == 3



def test_the_lip_sync_option_rules_are_the_contracts_and_the_stages_own_check_uses_them():
    """A bad box, a box mode without a box, pads or a factor out of range: refused when the request
    is parsed (the one check of a request's options), naming the field; the lip-sync stage's check
    of what it resolved applies the same numbers (lipserve.contract's)."""
    from lipserve.contract import MAX_PAD, MAX_RESIZE_FACTOR, parse_request
    from lipserve.lipsync.options import LipSyncOptions, check_options

    body = {"word": "hi", "user_video_gs": "a.mp4", "output_video_gs": "b.mp4"}
    for options, field in [({"box": {"x1": 10, "y1": 2, "x2": 5, "y2": 40}}, "options.box"),
                           ({"face_mode": "box"}, "options"),
                           ({"pads": [0, MAX_PAD + 1, 0, 0]}, "options.pads"),
                           ({"resize_factor": MAX_RESIZE_FACTOR + 1}, "options.resize_factor")]:
        with pytest.raises(InvalidField) as err:
            parse_request({**body, "options": options})
        assert err.value.field.startswith(field), (options, err.value.field)
    resolved = dict(face_mode="auto", pads=(0, 0, 0, 0), resize_factor=1)
    check_options(LipSyncOptions(**resolved))
    for change in ({"pads": (0, MAX_PAD + 1, 0, 0)}, {"resize_factor": MAX_RESIZE_FACTOR + 1},
                   {"face_mode": "box"}, {"face_mode": "wobble"}):
        with pytest.raises(InvalidField):
            check_options(LipSyncOptions(**{**resolved, **change}))


def test_the_lip_sync_stage_settings_are_what_a_request_gets(tmp_path):
    """A request without face options gets the LipSyncer's own settings (its deployment's user_config),
    whatever the ingress's settings say; what the request sets wins."""
    from lipserve.lipsync import LipSyncer, LipSyncOptions

    stage = LipSyncer(Settings(weights_dir=tmp_path, allow_synthetic_weights=True, device="cpu",
                               face_mode="static", pads=(1, 2, 3, 4), resize_factor=2))
    request = LipSyncOptions(**lipsync_options(RequestOptions()))
    resolved = stage.resolve(request)
    assert (resolved.face_mode, resolved.pads, resolved.resize_factor) == ("static", (1, 2, 3, 4), 2)
    clip = testmedia.astronaut_clip(seconds=1.0, fps=25, size=(320, 180), audio=None, motion="pan")
    assert stage.plan_faces(clip, request, 25, use_cache=False).mode == "static"
    asked = LipSyncOptions(**lipsync_options(RequestOptions(face_mode="track")))
    assert stage.plan_faces(clip, asked, 25, use_cache=False).mode == "track"


def test_check_video_limits():
    clip = testmedia.astronaut_clip(seconds=2.0, fps=10, size=(160, 120), audio=None)
    assert check_video(clip, Settings()).info.n_frames == 20
    with pytest.raises(VideoTooLong):
        check_video(clip, Settings(max_video_seconds=1.0))
    with pytest.raises(InvalidMedia):
        check_video(b"not a video at all" * 10, Settings())


def test_request_id_is_kept_when_sane_and_made_otherwise():
    assert new_request_id("abc-123") == "abc-123"
    made = new_request_id("bad id with spaces\n")
    assert made != "bad id with spaces\n" and len(made) == 16


# ---------------------------------------------------------------- end to end, one process

@pytest.fixture(scope="module")
def local_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-root")
    weights = tmp_path_factory.mktemp("no-weights")
    (root / "src.mp4").write_bytes(testmedia.astronaut_clip(seconds=3.0, fps=25, size=(320, 240), audio="speechlike"))
    settings = Settings(storage_root=root, weights_dir=weights, allow_synthetic_weights=True,
                        tts_order=["piper"], device="cpu", torch_threads=1)
    return Pipeline(settings), root


@pytest.mark.slow
def test_pipeline_end_to_end_on_local_paths(local_pipeline):
    pipeline, root = local_pipeline
    events = []
    response = pipeline.run(_request(word="Hello there.", user_video_gs="src.mp4", output_video_gs="out/a.mp4"),
                            request_id="local-1", progress=lambda s, e, sec: events.append((s, e)))
    assert response.request_id == "local-1"
    assert set(STAGES) | {"first_frame", "total"} == set(response.step_times)
    # the first lip-synced frame comes after the speech and its voice conversion, before the end
    st = response.step_times
    assert st["tts"] + st["voice"] < st["first_frame"] < st["total"]
    assert response.synthetic_weights and "SYNTHETIC" in response.warnings[0]
    assert response.precision["voice"] == "fp32" and -1 <= response.voice_similarity <= 1
    assert {(s, "end") for s in STAGES} <= set(events)
    data = (root / "out" / "a.mp4").read_bytes()
    info = media.probe(data)
    assert info.has_audio and info.video_codec == "h264"
    speech_s = media.read_audio(data, 16000).size / 16000
    assert abs(info.duration - speech_s) <= 1 / info.fps + 0.03
    # the default face mode (auto) spreads its detections over the frames the speech needs, so
    # the face plan starts once TTS is done, beside voice conversion
    spans = response.stage_spans
    assert spans["faces"][0] >= spans["tts"][1] - 0.01
    assert spans["faces"][0] < spans["voice"][1]
    assert response.frames_passed_through == 0 and response.precision["lipsync"] == "fp32"
    assert any("Haar cascade" in w for w in response.warnings)  # no s3fd.pth here
    assert not list(root.glob("out/.*tmp"))  # no temporary file left behind

    # the same video again with a shorter sentence: face boxes and speaker embedding come from the
    # caches (a longer one would detect on the frames not seen before, and say so)
    again = pipeline.run(_request(word="Hi.", user_video_gs="src.mp4", output_video_gs="out/b.mp4"))
    assert again.cache["face_boxes"] and again.cache["speaker_embedding"]


@pytest.mark.slow
def test_a_request_hashes_and_probes_its_source_video_once(local_pipeline, monkeypatch):
    """The SourceVideo made at the probe step carries the hash and the probe to every stage: the
    face plan, the voice's reference and the lip sync never hash or probe the same bytes again."""
    import hashlib
    import sys

    pipeline, root = local_pipeline
    size = (root / "src.mp4").stat().st_size
    calls = {"hash": 0, "probe": 0}
    real_sha256, probe_module = hashlib.sha256, sys.modules["lipserve.media.probe"]
    real_probe = probe_module.probe

    def sha256(data=b"", *args, **kwargs):
        calls["hash"] += len(data) == size
        return real_sha256(data, *args, **kwargs)

    def probe(data):
        calls["probe"] += len(data) == size
        return real_probe(data)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    monkeypatch.setattr(probe_module, "probe", probe)
    monkeypatch.setattr(media, "probe", probe)
    pipeline.stages.lipsync.clear_face_cache()  # a new video's path: detection runs
    response = pipeline.run(_request(word="Once only.", user_video_gs="src.mp4", output_video_gs="out/once.mp4",
                                     options=RequestOptions(face_mode="track")))
    assert response.cache["face_boxes"] is False
    assert calls == {"hash": 1, "probe": 1}


@pytest.mark.slow
def test_pipeline_box_mode_plans_faces_beside_tts(local_pipeline):
    pipeline, root = local_pipeline
    box = FaceBox(x1=90, y1=40, x2=200, y2=170)
    response = pipeline.run(_request(word="Box me.", user_video_gs="src.mp4", output_video_gs="out/t.mp4",
                                     options=RequestOptions(face_mode="box", box=box)))
    spans = response.stage_spans
    # a given box needs no frames: the face plan does not wait for the speech
    assert spans["faces"][0] < spans["tts"][1]
    assert response.engines["faces"] == "given"
    assert not any("Haar cascade" in w for w in response.warnings)  # no detector ran
    assert (root / "out" / "t.mp4").is_file()


@pytest.mark.slow
def test_pipeline_refuses_existing_output_before_any_stage(local_pipeline):
    pipeline, root = local_pipeline
    (root / "out").mkdir(exist_ok=True)
    (root / "out" / "exists.mp4").write_bytes(b"keep me")
    started = []
    with pytest.raises(OutputExists):
        pipeline.run(_request(user_video_gs="src.mp4", output_video_gs="out/exists.mp4"),
                     progress=lambda s, e, sec: started.append(s))
    assert started == []
    assert (root / "out" / "exists.mp4").read_bytes() == b"keep me"


def _write_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    import scipy.io.wavfile

    scipy.io.wavfile.write(path, rate, (testmedia.speechlike(seconds, rate, seed=4) * 32767).astype("int16"))
    return path


def test_given_audio_lets_word_be_empty_and_is_checked_like_other_inputs(root):
    settings = Settings(storage_root=root)
    pre = preflight(_request(word="", options=RequestOptions(audio="in/speech.wav")), settings, Storage(settings), LANGS)
    assert pre.audio_uri == "in/speech.wav" and pre.text == ""
    with pytest.raises(EmptyText):
        preflight(_request(word=" "), settings, Storage(settings), LANGS)
    with pytest.raises(PathEscape):
        preflight(_request(options=RequestOptions(audio="../speech.wav")), settings, Storage(settings), LANGS)
    with pytest.raises(InvalidURI):
        preflight(_request(options=RequestOptions(audio="s3://b/speech.wav")), settings, Storage(settings), LANGS)


def test_load_given_speech_decodes_to_16k_and_names_its_errors(root):
    settings = Settings(storage_root=root, max_speech_seconds=2.0)
    storage = Storage(settings)
    _write_wav(root / "in" / "speech.wav", 1.5)
    speech = load_given_speech(storage, "in/speech.wav", settings)
    assert speech.sample_rate == 16000 and speech.engine == "given" and speech.voice == "speech.wav"
    assert abs(speech.duration_s - 1.5) < 0.01 and speech.audio.dtype.name == "float32"
    _write_wav(root / "in" / "long.wav", 2.6)
    with pytest.raises(AudioTooLong):
        load_given_speech(storage, "in/long.wav", settings)
    with pytest.raises(InvalidAudio):
        load_given_speech(storage, "in/src.mp4", settings)  # one byte: not audio
    with pytest.raises(SourceNotFound):
        load_given_speech(storage, "in/none.wav", settings)


@pytest.mark.slow
def test_pipeline_with_the_callers_speech_and_box(local_pipeline):
    pipeline, root = local_pipeline
    _write_wav(root / "speech.wav", 1.6)
    box = FaceBox(x1=90, y1=50, x2=230, y2=200)
    response = pipeline.run(_request(word="", user_video_gs="src.mp4", output_video_gs="out/given.mp4",
                                     options=RequestOptions(audio="speech.wav", box=box)))
    assert response.engines["tts"] == "given:speech.wav" and response.engines["faces"] == "given"
    assert set(STAGES) | {"first_frame", "total"} == set(response.step_times)
    assert abs(response.duration_s - 1.6) <= 1 / 25 + 0.01
    info = media.probe((root / "out" / "given.mp4").read_bytes())
    assert info.has_audio and abs(info.duration - 1.6) < 0.1


# ---------------------------------------------------------------- the command line

def _lipserve() -> list[str]:
    return [sys.executable, "-m", "lipserve.cli"]


@pytest.mark.slow
def test_cli_run_makes_a_video(tmp_path):
    src, out = tmp_path / "me.mp4", tmp_path / "said.mp4"
    src.write_bytes(testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio="speechlike"))
    env = {**os.environ, "LIPSERVE_WEIGHTS_DIR": str(tmp_path / "none"), "LIPSERVE_TTS_ORDER": "piper",
           "LIPSERVE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_lipserve() + ["run", "--video", str(src), "--text", "Hi there.", "--out", str(out),
                                         "--synthetic-weights"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC WEIGHTS" in proc.stderr
    assert "warning: faces were found with OpenCV's Haar cascade" in proc.stderr  # the response's warnings
    for stage in ("tts", "voice", "lipsync"):
        assert f"] {stage}" in proc.stderr  # a progress line per long stage
    assert f"wrote {out}" in proc.stdout
    assert media.probe(out.read_bytes()).has_audio


@pytest.mark.slow
def test_cli_run_with_own_audio_and_box(tmp_path):
    src, out = tmp_path / "me.mp4", tmp_path / "said.mp4"
    src.write_bytes(testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio="speechlike"))
    speech = _write_wav(tmp_path / "speech.wav", 1.2)
    env = {**os.environ, "LIPSERVE_WEIGHTS_DIR": str(tmp_path / "none"), "LIPSERVE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_lipserve() + ["run", "--video", str(src), "--audio", str(speech), "--box", "90", "50", "230",
                                         "200", "--out", str(out), "--synthetic-weights", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    body = json.loads(proc.stdout)
    assert body["engines"]["tts"] == "given:speech.wav" and body["engines"]["faces"] == "given"
    assert abs(media.probe(out.read_bytes()).duration - 1.2) < 0.1


@pytest.mark.slow
def test_cli_run_streams_the_answer_to_stdout_and_still_writes_the_whole_file(tmp_path):
    """`lipserve run --stream -`: stdout is the fragmented MP4 as it was made (a pipe can play it),
    the same bytes as the file written at --out; the summary goes to stderr, off the video."""
    src, out = tmp_path / "me.mp4", tmp_path / "said.mp4"
    src.write_bytes(testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio="speechlike"))
    speech = _write_wav(tmp_path / "speech.wav", 1.2)
    env = {**os.environ, "LIPSERVE_WEIGHTS_DIR": str(tmp_path / "none"), "LIPSERVE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_lipserve() + ["run", "--video", str(src), "--audio", str(speech), "--box", "90", "50", "230",
                                         "200", "--out", str(out), "--synthetic-weights", "--stream", "-o", "-"],
                          env=env, capture_output=True, timeout=600)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert proc.stdout == out.read_bytes()
    assert proc.stdout[4:8] == b"ftyp" and b"moof" in proc.stdout  # fragmented, not a whole-file mp4
    assert f"wrote {out}" in stderr and "first fragment after" in stderr
    assert abs(media.probe(proc.stdout).duration - 1.2) < 0.1


def test_cli_needs_text_or_audio(tmp_path):
    proc = subprocess.run(_lipserve() + ["run", "--video", str(tmp_path / "me.mp4"), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--text" in proc.stderr and "--audio" in proc.stderr
    proc = subprocess.run(_lipserve() + ["run", "--video", "v.mp4", "--text", "x", "--out", "o.mp4", "--box", "1", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # argparse: --box takes four numbers


def test_cli_reports_a_missing_source_without_loading_models(tmp_path):
    proc = subprocess.run(_lipserve() + ["run", "--video", str(tmp_path / "nope.mp4"), "--text", "Hi",
                                         "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "404 source_not_found" in proc.stderr
    assert "loading models" not in proc.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_cli_has_weights_commands():
    proc = subprocess.run(_lipserve() + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "run" in proc.stdout and "weights" in proc.stdout
