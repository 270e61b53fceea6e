"""Issue 10, the video side, on generated clips of a real face (synthetic Wav2Lip weights, Haar
detector): a moving head is followed by default, face-less stretches pass through untouched, the
source's colours and tags survive, a photo works, static mode looks past a face-less opening.

Clips are short and small on purpose (the whole suite must stay quick on 2 cores).
"""
import numpy as np
import pytest
import torch

from devtools import testmedia
from lipserve import media
from lipserve.lipsync import LipSyncOptions
from lipserve.lipsync import precision as precision_module
from lipserve.lipsync import syncer as syncer_module
from lipserve.lipsync.detectors import HaarDetector, detect_boxes
from lipserve.lipsync.faces import box_iou, padded_crop_boxes
from lipserve.lipsync.planner import AUTO_PROBES, TRACK_MAX_SIDE

FPS = 25



@pytest.fixture
def encoded_frames(monkeypatch) -> list:
    """Every frame the syncer hands to the encoder, as handed (to compare bytes before encoding)."""
    seen: list[np.ndarray] = []
    real = media.encode_mp4

    def recording(frames, *args, **kwargs):
        def copy_as_passed():
            for frame in frames:
                seen.append(np.array(frame, copy=True))
                yield frame
        return real(copy_as_passed(), *args, **kwargs)

    monkeypatch.setattr(syncer_module.media, "encode_mp4", recording)
    return seen


def channel_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) - b.astype(np.float64)).reshape(-1, 3).mean(axis=0)


# ----------------------------------------------------------------------------- a moving head

def test_default_mode_follows_a_head_moving_100_px_in_2_s(fresh):
    clip = testmedia.astronaut_clip(seconds=2.0, fps=FPS, size=(640, 360), audio=None, motion="pan")
    truth = [testmedia.face_box_truth(i, FPS, (640, 360), "pan") for i in range(50)]
    assert truth[-1][0] - truth[0][0] >= 95  # the head really travels ~100 px

    plan = fresh.plan_faces(clip, LipSyncOptions(), 50)  # the default mode
    assert plan.mode == "auto/track" and plan.present.all()

    frames = media.decode_frames(clip)
    per_frame = detect_boxes(HaarDetector(), frames, TRACK_MAX_SIDE)
    ious = [box_iou(box, found) for box, found in zip(plan.boxes, per_frame)]
    print(f"auto on the moving head: IoU with a per-frame detection, min {min(ious):.3f}, "
          f"mean {np.mean(ious):.3f}; {plan.detected_frames} detections")
    assert min(ious) >= 0.8

    # the single box of static mode would drift off the face: the test can tell the difference
    static = fresh.plan_faces(clip, LipSyncOptions(face_mode="static"), 50)
    assert min(box_iou(box, found) for box, found in zip(static.boxes, per_frame)) < 0.5


def test_default_mode_keeps_one_box_for_a_still_head(fresh, astronaut_still):
    plan = fresh.plan_faces(astronaut_still, LipSyncOptions(), 50)
    assert plan.mode == "auto/still"
    assert plan.detected_frames == AUTO_PROBES  # static's one detection plus four
    assert (plan.boxes == plan.boxes[0]).all() and plan.present.all()
    assert box_iou(plan.boxes[0], np.array(testmedia.face_box_truth(0, motion=False))) > 0.6
    # the same video with a longer answer probes the new stretch only, and stays still
    longer = fresh.plan_faces(astronaut_still, LipSyncOptions(), 100)
    assert longer.mode == "auto/still" and longer.detected_frames == AUTO_PROBES


# ----------------------------------------------------------------------------- frames without a face

CUT_FIRST, CUT_LAST = 23, 47  # a 1 s cut-away (25 frames) that starts between two track keyframes


@pytest.mark.slow
def test_a_one_second_cut_away_passes_through_untouched(fresh, encoded_frames):
    cut = (CUT_FIRST / FPS, (CUT_LAST + 1) / FPS)
    clip = testmedia.astronaut_clip(seconds=3.0, fps=FPS, size=(320, 180), audio=None, motion=False, cut_away=cut)
    speech = testmedia.speechlike(2.5, sample_rate=16000)  # 63 output frames
    result = fresh.sync(clip, speech, 16000, LipSyncOptions())  # default mode: no 422
    assert result.n_frames == 63 and result.face_mode == "auto/track"
    info = media.probe(result.mp4)
    assert info.n_frames == 63 and abs(info.duration - 2.5) <= 1 / FPS + 1e-6
    assert result.frames_passed_through == CUT_LAST - CUT_FIRST + 1
    assert any(f"no face in 25 of 63 output frames (frames {CUT_FIRST}-{CUT_LAST})" in w for w in result.warnings)
    assert any("Haar cascade" in w for w in result.warnings)

    source = media.decode_frames(clip, 63)
    assert len(encoded_frames) == 63
    for i in range(63):
        same = np.array_equal(encoded_frames[i], source[i])
        assert same == (CUT_FIRST <= i <= CUT_LAST), i  # the cut-away exactly as decoded; faces redrawn
    output = media.decode_frames(result.mp4)
    cut_diff = np.abs(output[CUT_FIRST:CUT_LAST + 1].astype(int) - source[CUT_FIRST:CUT_LAST + 1]).mean()
    assert cut_diff < 3.0  # after encoding: the source's frames within codec noise


def test_a_short_gap_is_bridged_and_static_looks_past_a_faceless_opening(fresh):
    # 0.36 s without a face between two faces: bridged (the box is interpolated), nothing passes through
    clip = testmedia.astronaut_clip(seconds=2.0, fps=FPS, size=(320, 180), audio=None, motion="pan",
                                    cut_away=(0.8, 1.16))
    plan = fresh.plan_faces(clip, LipSyncOptions(face_mode="track"), 50)
    assert plan.present.all()
    for i in range(20, 29):  # inside the gap: between the boxes on either side
        assert plan.boxes[19][0] <= plan.boxes[i][0] <= plan.boxes[29][0]
    # static mode: the first 2.2 s show no face; its tries spread over the 75 frames used find one
    late = testmedia.astronaut_clip(seconds=3.0, fps=FPS, size=(320, 180), audio=None, motion=False,
                                    cut_away=(0.0, 2.2))
    static = fresh.plan_faces(late, LipSyncOptions(face_mode="static"), 75)
    assert static.detected_frames >= 4 and static.present.all()
    assert box_iou(static.boxes[0], np.array(testmedia.face_box_truth(70, FPS, (320, 180), False))) > 0.6


# ----------------------------------------------------------------------------- colours

@pytest.mark.parametrize("size, colour, tags", [
    ((1920, 1080), testmedia.BT709, ("bt709", "tv", "1", "1")),
    ((640, 360), None, ("smpte170m", "tv", "2", "2")),
], ids=["1080p-bt709", "360p-untagged"])
def test_colours_and_tags_of_the_source_are_kept(fresh, size, colour, tags):
    clip = testmedia.astronaut_clip(seconds=0.28, fps=FPS, size=size, audio=None, motion=False, colour=colour)
    speech = testmedia.speechlike(0.2, sample_rate=16000)  # 5 frames
    options = LipSyncOptions(face_mode="static")
    result = fresh.sync(clip, speech, 16000, options)
    names = media.probe(result.mp4).colour.names()
    assert (names["matrix"], names["range"], names["primaries"], names["transfer"]) == tags

    source = media.decode_frames(clip, 5)
    output = media.decode_frames(result.mp4)
    plan = fresh.plan_faces(clip, options, 5)
    x1, y1, x2, y2 = padded_crop_boxes(plan.boxes[:1], fresh.resolve(options).pads, size[0], size[1])[0]
    outside = np.ones(source.shape[1:3], dtype=bool)
    outside[y1:y2, x1:x2] = False
    shift = channel_shift(output[:, outside], source[:, outside])
    noise = np.abs(output[:, outside].astype(int) - source[:, outside]).mean()
    print(f"{size[0]}x{size[1]} {names['matrix']}: outside the face crop, per-channel mean shift "
          f"{np.round(shift, 3).tolist()}, mean abs difference {noise:.2f}")
    assert np.abs(shift).max() < 1.0
    assert noise < 3.0


# ----------------------------------------------------------------------------- a photo

@pytest.mark.parametrize("fmt", [".jpg", ".png"])
def test_a_photo_gives_a_video_as_long_as_the_speech(fresh, fmt):
    photo = testmedia.astronaut_photo((320, 180), fmt)
    info = media.probe(photo)
    assert info.is_image and info.n_frames == 1
    speech = testmedia.speechlike(0.4, sample_rate=16000)
    result = fresh.sync(photo, speech, 16000, LipSyncOptions())
    assert result.n_frames == 10 and result.frames_passed_through == 0
    assert media.probe(result.mp4).n_frames == 10


# ----------------------------------------------------------------------------- reduced precision

def test_the_precision_check_uses_face_crops_of_the_test_clip():
    import cv2
    shipped = cv2.cvtColor(cv2.imread(str(precision_module.PRECISION_FACES)), cv2.COLOR_BGR2RGB)
    crops = testmedia.precision_face_crops()
    assert np.array_equal(shipped, np.concatenate(list(crops), axis=1))  # regenerable from testmedia
    faces, windows = precision_module.precision_probe(8)
    assert faces.shape == (8, 6, 96, 96) and windows.shape == (8, 1, 80, 16)
    assert float(windows.std()) > 0.5  # speech, not silence


@pytest.mark.slow
def test_reduced_precision_is_kept_only_within_half_a_level_of_fp32(syncer, monkeypatch):
    # CPU autocast with bf16 stands in for CUDA fp16: the same check, against fp32 (CPU bf16 convolutions
    # are slow, so one face crop)
    assert syncer.autocast is None and syncer.precision_name == "fp32"  # CPU, precision auto: fp32, unchecked
    try:
        syncer.autocast = torch.bfloat16
        gap = syncer.autocast_gap(n_faces=1)
        print(f"bf16 autocast against fp32 on a face crop of the test clip: {gap:.3f} 8-bit levels at most")
        assert 0 < gap < 8
        monkeypatch.setattr(precision_module, "AUTOCAST_MAX_LEVELS", gap * 2)
        syncer._check_autocast(keep_anyway=False, gap=gap)
        assert syncer.autocast is torch.bfloat16 and syncer.precision_name == "bf16"  # close enough: kept
        monkeypatch.setattr(precision_module, "AUTOCAST_MAX_LEVELS", gap / 2)
        syncer._check_autocast(keep_anyway=True, gap=gap)  # set explicitly: kept, and the response says so
        assert syncer.precision_name == "bf16" and any("bf16" in w for w in syncer._warnings(_no_rendering()))
        syncer._check_autocast(keep_anyway=False, gap=gap)
        assert syncer.autocast is None and syncer.precision_name == "fp32"  # too far from fp32: back to fp32
    finally:
        syncer.autocast, syncer.precision_gap = None, None


def _no_rendering():
    """The least a Rendering needs for LipSyncer._warnings: a given box, no frame passed through."""
    from types import SimpleNamespace
    return SimpleNamespace(plan=SimpleNamespace(detector="given"), passed_through=np.zeros(3, dtype=bool))
