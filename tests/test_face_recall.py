"""Faces that are there are found: sideways-stored phone video is detected upright on every decode
path, and a frame the first pass misses gets a second look before it passes through (a tilted
head, a face too small for the first pass's smaller copy). Haar fallback detector, synthetic
Wav2Lip weights; benchmarks/bench_face_recall.py measures recall on many more clips.
"""
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from devtools import testmedia
from lipserve import media
from lipserve.lipsync import LipSyncOptions
from lipserve.lipsync.detectors import FaceDetector, HaarDetector, detect_boxes
from lipserve.lipsync.faces import AGREE_FRAMES, box_iou, second_look
from lipserve.lipsync.planner import TRACK_MAX_SIDE

FPS = 25
PORTRAIT = (360, 640)  # upright width, height



def mkv_with_rotate_tag(seconds: float, rotate: int) -> bytes:
    """The upright portrait clip stored turned, with only the legacy `rotate` stream tag (clockwise
    degrees to display), as Matroska writers and old FFmpeg builds leave it: no display matrix."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height = PORTRAIT[1], PORTRAIT[0]
        stream.pix_fmt = "yuv420p"
        stream.metadata["rotate"] = str(rotate)
        for i in range(round(seconds * FPS)):
            upright = testmedia.render_frame(i / FPS, PORTRAIT, motion="pan")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(upright, k=rotate // 90)), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def sideways(kind: str, rotate: int, seconds: float = 2.0) -> bytes:
    if kind == "matrix":
        return testmedia.astronaut_clip(seconds=seconds, fps=FPS, size=PORTRAIT, audio=None, motion="pan",
                                        rotate=rotate)
    return mkv_with_rotate_tag(seconds, rotate)


@pytest.mark.parametrize("kind, rotate", [("matrix", 90), ("matrix", 270), ("tag", 90), ("tag", 270)])
def test_a_sideways_stored_portrait_is_found_upright_on_every_decode_path(fresh, kind, rotate):
    clip = sideways(kind, rotate)
    info = media.probe(clip)
    assert (info.width, info.height, info.rotation) == (*PORTRAIT, rotate)

    # the planner's windowed decode (a seek to a later keyframe) turns frames as the first decode does
    whole = media.decode_frames(clip, 30)
    assert whole.shape[1:3] == (PORTRAIT[1], PORTRAIT[0])
    assert np.array_equal(media.decode_frames(clip, 5, start=25), whole[25:30])

    plan = fresh.plan_faces(clip, LipSyncOptions(), 50)  # the default mode
    assert plan.present.all()
    truth = [testmedia.face_box_truth(i, FPS, PORTRAIT, "pan") for i in range(50)]
    ious = [box_iou(box, np.array(t, dtype=float)) for box, t in zip(plan.boxes, truth)]
    assert min(ious) >= 0.5, min(ious)

    result = fresh.sync(clip, testmedia.speechlike(1.0, sample_rate=16000), 16000, LipSyncOptions())
    out = media.probe(result.mp4)
    assert (out.width, out.height, out.rotation) == (*PORTRAIT, 0)  # upright pixels, no tag left to apply
    assert result.frames_passed_through == 0


TILT = (0.6, 1.5, 25.0)  # 0.9 s (23 frames) with the head tilted 25 degrees: longer than a bridgeable gap


def test_a_tilted_head_the_first_pass_misses_is_still_synced(fresh):
    clip = testmedia.astronaut_clip(seconds=2.0, fps=FPS, size=(640, 360), audio=None, motion="pan", tilt=TILT)
    frames = media.decode_frames(clip, 50)
    tilted = [i for i in range(50) if TILT[0] <= i / FPS < TILT[1]]
    first_pass = detect_boxes(HaarDetector(), frames[tilted], TRACK_MAX_SIDE)
    assert all(box is None for box in first_pass)  # the case under test: the first pass sees no face there

    plan = fresh.plan_faces(clip, LipSyncOptions(), 50)
    assert plan.mode == "auto/track" and plan.present.all()
    truth = [np.array(testmedia.face_box_truth(i, FPS, (640, 360), "pan"), dtype=float) for i in range(50)]
    ious = [box_iou(plan.boxes[i], truth[i]) for i in range(50)]
    assert min(ious) >= 0.5, (int(np.argmin(ious)), min(ious))


@pytest.mark.slow
def test_a_face_too_small_for_the_first_pass_is_found_at_full_resolution(fresh):
    # 1280x720 with the head far from the camera: a ~55 px face is ~20 px in the first pass's 480 px copy
    size = (1280, 720)
    clip = testmedia.astronaut_clip(seconds=1.0, fps=FPS, size=size, audio=None, motion="far")
    frames = media.decode_frames(clip, 25)
    assert all(box is None for box in detect_boxes(HaarDetector(), frames[::6], TRACK_MAX_SIDE))

    plan = fresh.plan_faces(clip, LipSyncOptions(), 25)
    assert plan.present.all()
    truth = [np.array(testmedia.face_box_truth(i, FPS, size, "far"), dtype=float) for i in range(25)]
    assert min(box_iou(plan.boxes[i], truth[i]) for i in range(25)) >= 0.5


# ----------------------------------------------------------------------------- the rule, on its own

class ScriptedDetector(FaceDetector):
    """Frames are filled with their own index; `lenient` maps index -> the box its lenient look gives."""

    name = "scripted"

    def __init__(self, lenient: dict[int, tuple]):
        self.lenient = lenient

    def detect(self, frames):
        return [None for _ in frames]

    def detect_lenient(self, frames):
        boxes = [self.lenient.get(int(frame.reshape(-1)[0])) for frame in frames]
        return [None if box is None else np.array(box, dtype=float) for box in boxes]


def index_frames(indices):
    return np.stack([np.full((64, 64, 3), i, dtype=np.uint8) for i in indices]), 1.0


def test_a_lone_lenient_hit_is_not_believed_a_run_of_agreeing_ones_is():
    face = np.array((10.0, 10.0, 40.0, 40.0))
    # a face at frame 0 only; after it, no face near it (the lenient look finds none there), a lone
    # lenient hit at 3, and three agreeing ones at 10-12 with no face next to them
    detector = ScriptedDetector({3: (12, 12, 42, 42), 10: (20, 10, 50, 40), 11: (21, 10, 51, 40),
                                 12: (22, 10, 52, 40)})
    keyframes = {0: face} | {i: None for i in (5, 10, 15, 20, 25, 29)}
    looked = second_look(detector, keyframes, 30, max_gap=2, frames_for=index_frames)
    found = sorted(i for i, b in keyframes.items() if b is not None)
    assert AGREE_FRAMES == 3 and found == [0, 10, 11, 12]
    assert looked >= 29  # every frame after the face was looked at again
