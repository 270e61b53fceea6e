"""The lip-sync stage end to end on generated clips of a real face (synthetic Wav2Lip weights,
OpenCV Haar detector): durations, decode/detect counts, tracking, the face cache, ping-pong,
and the named errors."""
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from devtools import testmedia
from lipserve import media
from lipserve.errors import InvalidField, NoFaceFound, WeightsMissing
from lipserve.lipsync import FacePlan, LipSyncer, LipSyncOptions, SyncResult
from lipserve.lipsync.blend import crops_to_model_input
from lipserve.lipsync.faces import box_iou
from lipserve.lipsync.timeline import SILENT_MEL, mel_for_output, pingpong_indices
from lipserve.settings import Settings

FPS = 25
SPEECH_RATE = 44100  # not 16 kHz on purpose: the syncer resamples for the mel



@pytest.fixture(scope="module")
def speech_2s() -> np.ndarray:
    return testmedia.speechlike(2.0, sample_rate=SPEECH_RATE)


@contextmanager
def limits(syncer, **overrides):
    saved = syncer.settings
    syncer.settings = saved.replace(**overrides)
    try:
        yield
    finally:
        syncer.settings = saved


def _centre(box):
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


# ----------------------------------------------------------------------------- pure parts

def test_pingpong_indices():
    assert pingpong_indices(12, 5).tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    assert pingpong_indices(4, 10).tolist() == [0, 1, 2, 3]
    assert pingpong_indices(3, 1).tolist() == [0, 0, 0]


def test_mel_windows_follow_the_official_chunking_then_see_silence(wav2lip_audio_golden):
    official = wav2lip_audio_golden["mel_chunk_starts"]  # 47 windows for 2 s: ends ~0.2 s early
    mel = wav2lip_audio_golden["mel"]
    padded, ours = mel_for_output(mel, 50, 25.0)          # one window per output frame: 2 s
    assert len(official) == 47 and len(ours) == 50
    assert ours[:46].tolist() == official[:46].tolist()
    assert ours.tolist() == [int(i * 80 / 25) for i in range(50)]
    assert np.array_equal(padded[:, :mel.shape[1]], mel)  # the speech's own mel is untouched
    # the official script's last window is the final 16 mel frames, reused; ours run on past the
    # speech into silence (the floor of the scale), so the last frames close the mouth
    n = mel.shape[1]
    assert ours[-1] + 16 > n and padded.shape[1] == ours[-1] + 16
    tail = padded[:, ours[-1]:ours[-1] + 16]
    assert (tail[:, n - ours[-1]:] == SILENT_MEL).all() and tail.shape == (80, 16)
    assert not np.array_equal(tail, mel[:, -16:])


def test_model_input_is_the_official_six_channels(wav2lip_golden):
    # golden crops are cv2 BGR; our frames are RGB, so hand the crops over as RGB
    crops = [torch.from_numpy(np.ascontiguousarray(c[..., ::-1])) for c in wav2lip_golden["face_crops_bgr_uint8"]]
    np.testing.assert_allclose(crops_to_model_input(crops).numpy(), wav2lip_golden["face"], atol=1e-6)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_track_sync_needs_only_the_answers_frames(fresh, astronaut_10s, speech_2s):
    options = LipSyncOptions(face_mode="track", track_every=5)
    result = fresh.sync(astronaut_10s, speech_2s, SPEECH_RATE, options)
    assert isinstance(result, SyncResult)
    assert result.n_frames == 50
    assert result.decoded_frames == 50              # not the source's 250
    assert result.detected_frames == math.ceil(50 / 5) + 1  # every 5th frame and the last
    assert result.synthetic_weights is True
    assert result.face_cache_hit is False
    assert set(result.timings) >= {"decode", "detect", "mel", "model", "paste", "encode"}

    info = media.probe(result.mp4)
    assert abs(info.duration - 2.0) <= 1 / FPS + 1e-6
    assert info.n_frames == 50 and info.has_audio
    audio = media.read_audio(result.mp4, 16000)
    assert abs(len(audio) / 16000 - 2.0) <= 1 / FPS + 0.03  # AAC adds at most a frame of priming

    # The mouth region changed, the top of the frame did not.
    out = media.decode_frames(result.mp4, count=1)[0].astype(int)
    src = media.decode_frames(astronaut_10s, count=1)[0].astype(int)
    truth = testmedia.face_box_truth(0)
    mouth = (slice(truth[1] + (truth[3] - truth[1]) * 3 // 4, truth[3]), slice(truth[0] + 20, truth[2] - 20))
    assert np.abs(out[mouth] - src[mouth]).mean() > 10
    assert np.abs(out[:20] - src[:20]).mean() < 3

    # the same video with another (shorter) sentence: no detection at all
    again = fresh.sync(astronaut_10s, speech_2s[: SPEECH_RATE * 2 // 5], SPEECH_RATE, options)
    assert again.face_cache_hit is True
    assert again.detected_frames == 0
    assert again.decoded_frames == again.n_frames == 10


def test_track_boxes_follow_the_face_and_extend(fresh, astronaut_10s):
    options = LipSyncOptions(face_mode="track", track_every=5)
    plan = fresh.plan_faces(astronaut_10s, options, 50)
    assert isinstance(plan, FacePlan) and plan.detector == "haar"
    assert plan.detected_frames == 10 + 1 and not plan.cached and plan.boxes.shape == (50, 4)  # every 5th + the last
    assert plan.present.all() and plan.mode == "track"

    longer = fresh.plan_faces(astronaut_10s, options, 250)  # the whole clip: only the 40 new keyframes + the last
    assert longer.detected_frames == 40 + 1
    assert np.array_equal(longer.boxes[:40], plan.boxes[:40])  # settled boxes stay as they were
    for i, box in enumerate(longer.boxes):
        truth = np.array(testmedia.face_box_truth(i))
        assert box_iou(box, truth) > 0.55, i
        assert np.abs(_centre(box) - _centre(truth)).max() < 0.2 * (truth[2] - truth[0]), i

    hit = fresh.plan_faces(astronaut_10s, options, 100)
    assert hit.cached and hit.detected_frames == 0 and hit.boxes.shape == (100, 4)


def test_static_plan_detects_once_and_sync_uses_the_plan(fresh, astronaut_10s):
    options = LipSyncOptions(face_mode="static")
    plan = fresh.plan_faces(astronaut_10s, options, 10)
    assert plan.detected_frames == 1
    assert (plan.boxes == plan.boxes[0]).all()
    assert box_iou(plan.boxes[0], np.array(testmedia.face_box_truth(0))) > 0.6
    speech = testmedia.speechlike(0.4, sample_rate=16000)  # 10 frames
    result = fresh.sync(astronaut_10s, speech, 16000, options, plan=plan)
    assert result.detected_frames == 0 and result.n_frames == 10 and result.decoded_frames == 10


def test_tensor_path_of_the_loop_matches_the_cpu_path(fresh, astronaut_10s):
    # The GPU build crops and blends with torch ops; run that branch here on the CPU and compare.
    speech = testmedia.speechlike(0.4, sample_rate=16000)
    by_cv2 = media.decode_frames(fresh.sync(astronaut_10s, speech, 16000, LipSyncOptions()).mp4)
    fresh.tensor_ops = True
    try:
        by_torch = media.decode_frames(fresh.sync(astronaut_10s, speech, 16000, LipSyncOptions()).mp4)
    finally:
        fresh.tensor_ops = False
    assert by_cv2.shape == by_torch.shape == (10, 360, 640, 3)
    assert np.abs(by_cv2.astype(int) - by_torch.astype(int)).mean() < 0.5


def test_resize_factor_and_very_short_speech(fresh, astronaut_10s):
    # resize_factor 2: the answer comes out at half size; boxes stay in source pixels
    result = fresh.sync(astronaut_10s, testmedia.speechlike(0.4, sample_rate=16000), 16000,
                        LipSyncOptions(face_mode="static", resize_factor=2))
    info = media.probe(result.mp4)
    assert (info.width, info.height) == (320, 180) and result.n_frames == 10
    # under one mel window (0.2 s) of speech still gives an answer as long as the speech
    tiny = fresh.sync(astronaut_10s, testmedia.speechlike(0.1, sample_rate=16000), 16000, LipSyncOptions())
    assert tiny.n_frames == 3 and tiny.decoded_frames == 3
    assert abs(media.probe(tiny.mp4).duration - 0.12) <= 1 / FPS + 1e-6


@pytest.mark.slow
def test_speech_longer_than_video_plays_back_and_forth(fresh):
    clip = testmedia.astronaut_clip(seconds=0.6, fps=FPS, audio=None)  # 15 frames
    speech = testmedia.speechlike(1.0, sample_rate=16000)                 # 25 output frames
    result = fresh.sync(clip, speech, 16000, LipSyncOptions(face_mode="track"))
    assert result.n_frames == 25 and result.decoded_frames == 15
    source = media.decode_frames(clip).astype(np.float32)
    output = media.decode_frames(result.mp4).astype(np.float32)
    assert len(output) == 25
    # each output frame is closest to the ping-pong source frame (0..14, 13..4), not a jump to 0
    nearest = [int(np.argmin(((source - frame) ** 2).mean(axis=(1, 2, 3)))) for frame in output]
    assert nearest == pingpong_indices(25, 15).tolist()


# ----------------------------------------------------------------------------- errors

def test_no_face_is_a_422_that_says_so(fresh, noface_clip):
    for mode in ("static", "track"):
        with pytest.raises(NoFaceFound) as err:
            fresh.plan_faces(noface_clip, LipSyncOptions(face_mode=mode), 50)
        assert err.value.status == 422 and "no face" in err.value.message
    with pytest.raises(NoFaceFound):
        fresh.sync(noface_clip, testmedia.speechlike(1.0, sample_rate=16000), 16000, LipSyncOptions())


def test_box_mode(fresh, astronaut_10s):
    given = (250, 60, 380, 200)
    plan = fresh.plan_faces(astronaut_10s, LipSyncOptions(face_mode="box", box=given), 50)
    assert plan.detector == "given" and plan.detected_frames == 0
    assert (plan.boxes == np.array(given)).all()
    for bad in [(600, 300, 700, 400), None]:
        with pytest.raises(InvalidField) as err:
            fresh.plan_faces(astronaut_10s, LipSyncOptions(face_mode="box", box=bad), 50)
        assert err.value.status == 400
    with pytest.raises(InvalidField):
        fresh.sync(astronaut_10s, testmedia.speechlike(1.0, sample_rate=16000), 16000,
                   LipSyncOptions(face_mode="box", box=(600, 300, 700, 400)))


def test_bad_options_are_400(fresh, astronaut_10s):
    for options in [LipSyncOptions(face_mode="wobble"), LipSyncOptions(resize_factor=0),
                    LipSyncOptions(pads=(0, -1, 0, 0))]:
        with pytest.raises(InvalidField):
            fresh.plan_faces(astronaut_10s, options, 10)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(WeightsMissing) as err:
        LipSyncer(Settings(weights_dir=tmp_path, allow_synthetic_weights=False, device="cpu"))
    assert "wav2lip_gan.pth" in err.value.message and "fetch" in err.value.message


@pytest.mark.slow
def test_official_format_checkpoints_load(official_lipsync_weights_dir):
    syncer = LipSyncer(Settings(weights_dir=official_lipsync_weights_dir, device="cpu"))
    assert syncer.synthetic_weights is False
    assert syncer.detector.name == "s3fd"  # s3fd.pth present: the official detector, not Haar
    assert syncer.describe()["checkpoint"] == "wav2lip_gan.pth"
    # The S3FD path through the syncer, batched: this only exercises the code -- the s3fd.pth here
    # holds synthetic weights, whose "faces" are noise (serving never uses synthetic S3FD).
    clip = testmedia.astronaut_clip(seconds=0.4, fps=FPS, size=(320, 180), audio=None)  # 10 frames
    plan = syncer.plan_faces(clip, LipSyncOptions(face_mode="track", track_every=5), 10)
    assert plan.detector == "s3fd" and plan.detected_frames == 3 and plan.boxes.shape == (10, 4)  # 0, 5 and the last
    assert (plan.boxes[:, 2] > plan.boxes[:, 0]).all() and (plan.boxes[:, 3] > plan.boxes[:, 1]).all()


def test_cpu_and_tensor_paths_agree(wav2lip_golden):
    # The GPU path (torch ops) and the CPU path (cv2) must build the same input and the same blend.
    from lipserve.lipsync.blend import blend_mouths, blend_mouths_np, crops_to_model_input_np
    crops = [np.ascontiguousarray(c[..., ::-1]) for c in wav2lip_golden["face_crops_bgr_uint8"]]
    np.testing.assert_allclose(crops_to_model_input_np(crops).numpy(), wav2lip_golden["face"], atol=1e-6)
    rng = np.random.default_rng(5)
    regions = [rng.integers(0, 255, size=(150, 130, 3), dtype=np.uint8) for _ in range(2)]
    predictions = torch.from_numpy(wav2lip_golden["out"])
    via_cv2 = blend_mouths_np(predictions, regions)
    via_torch = [r.numpy() for r in blend_mouths(predictions, [torch.from_numpy(r) for r in regions])]
    for a, b, region in zip(via_cv2, via_torch, regions):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert np.array_equal(a[:40], region[:40])  # the upper face is left alone
        assert np.abs(a[100:140, 30:100].astype(int) - region[100:140, 30:100]).mean() > 20  # the mouth is redrawn


def test_plan_decodes_long_sources_in_windows(fresh, astronaut_10s, monkeypatch):
    # plan_faces on a long/large source decodes in bounded windows (seeking to each); same boxes
    from lipserve.lipsync import planner as planner_module
    options = LipSyncOptions(face_mode="track", track_every=10)
    whole = fresh.plan_faces(astronaut_10s, options, 120)
    fresh.clear_face_cache()
    monkeypatch.setattr(planner_module, "DECODE_WINDOW_BYTES", 640 * 360 * 3 * 25)  # 25-frame windows
    windowed = fresh.plan_faces(astronaut_10s, options, 120)
    assert windowed.detected_frames == whole.detected_frames == 12 + 1
    assert np.abs(windowed.boxes - whole.boxes).max() <= 2
