"""Face finding: S3FD decoding against the official detector's own output, NMS, the Haar fallback,
and the box arithmetic of the static/track/box modes."""
import numpy as np
import pytest
import torch

from lipserve.errors import InvalidField
from lipserve.lipsync.blend import MIN_FEATHER_PX, paste_mask
from lipserve.lipsync.detectors import (S3FD_TOP_K, HaarDetector, S3FDDetector, best_s3fd_face, detect_boxes, nms,
                                        s3fd_candidates)
from lipserve.lipsync.faces import (
    box_iou, face_presence, frame_ranges, interpolate_track, padded_crop_boxes, refine_frames, smooth_boxes,
    spread_frames, still_box, track_boxes, track_keyframes, validate_box,
)
from lipserve.models.s3fd import S3FD
from lipserve.weights.synthetic import fill_synthetic


@pytest.fixture(scope="module")
def synthetic_s3fd():
    net = S3FD()
    fill_synthetic(net)  # the detinit rule: the weights the golden was made with
    return net.eval()


def _golden_outputs(s3fd_golden):
    return [torch.from_numpy(s3fd_golden[f"out{i}"]) for i in range(12)]


def test_candidates_match_official_batch_detect(s3fd_golden):
    # The golden stores what the official batch_detect returned for these very network outputs:
    # every anchor's decoded box and face score, head by head, row-major. Ours must equal it.
    boxes, scores = s3fd_candidates(_golden_outputs(s3fd_golden))[0]
    expected = s3fd_golden["batch_detect_bboxlist"][:, 0]  # [1428, 5]
    assert boxes.shape == (1428, 4)
    np.testing.assert_allclose(boxes.numpy(), expected[:, :4], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), expected[:, 4], rtol=1e-5, atol=1e-6)


def test_candidate_threshold_drops_low_scores(s3fd_golden):
    outputs = _golden_outputs(s3fd_golden)
    _, all_scores = s3fd_candidates(outputs, threshold=0.0)[0]
    cut = float(np.median(all_scores.numpy()))
    _, kept = s3fd_candidates(outputs, threshold=cut)[0]
    assert 0 < len(kept) < len(all_scores)
    assert float(kept.min()) > cut


def test_preprocessing_reproduces_golden_network_outputs(synthetic_s3fd, s3fd_golden):
    # Official path: cv2 BGR image -> RGB -> minus (104, 117, 123) -> network.
    detector = S3FDDetector(synthetic_s3fd, torch.device("cpu"))
    rgb = s3fd_golden["image_bgr_uint8"][..., ::-1]
    outputs = detector.raw_outputs(rgb)
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out.numpy(), s3fd_golden[f"out{i}"], rtol=1e-4, atol=1e-4)


def _greedy_nms_reference(boxes, scores, threshold):
    """The textbook loop, written plainly, to check the vectorised version against."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        survivors = []
        for j in order:
            xx1, yy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            xx2, yy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, xx2 - xx1 + 1) * max(0.0, yy2 - yy1 + 1)
            area_i = (boxes[i, 2] - boxes[i, 0] + 1) * (boxes[i, 3] - boxes[i, 1] + 1)
            area_j = (boxes[j, 2] - boxes[j, 0] + 1) * (boxes[j, 3] - boxes[j, 1] + 1)
            if inter / (area_i + area_j - inter) <= threshold:
                survivors.append(j)
        order = survivors
    return keep


def test_nms_constructed_case():
    boxes = np.array([
        [10, 10, 50, 50],    # 0: face A
        [12, 12, 52, 52],    # 1: A shifted a little: suppressed by 0
        [100, 100, 140, 150],  # 2: face B
        [30, 30, 70, 70],    # 3: overlaps A by IoU ~0.14: kept
        [101, 101, 141, 151],  # 4: suppressed by 2
    ], dtype=np.float64)
    scores = np.array([0.9, 0.95, 0.8, 0.6, 0.7])
    keep = nms(boxes, scores, threshold=0.3)
    assert list(keep) == [1, 2, 3]  # best first; 0 falls to 1, 4 falls to 2
    assert list(keep) == _greedy_nms_reference(boxes, scores, 0.3)


def test_nms_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, size=(300, 2))
    wh = rng.uniform(10, 60, size=(300, 2))
    boxes = np.hstack([xy, xy + wh])
    scores = rng.uniform(0, 1, size=300)
    assert list(nms(boxes, scores, 0.3, top_k=None)) == _greedy_nms_reference(boxes, scores, 0.3)


def test_nms_caps_candidates():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, size=(5000, 2))
    boxes = np.hstack([xy, xy + 20])
    scores = rng.uniform(0, 1, size=5000)
    keep = nms(boxes, scores, 0.3, top_k=100)
    assert len(keep) <= 100
    assert set(keep) <= set(np.argsort(-scores)[:100])
    assert keep[0] == int(np.argmax(scores))


def test_best_face_is_top_box_above_half():
    boxes = np.array([[10, 10, 50, 50], [100, 100, 140, 140]], dtype=np.float64)
    assert np.array_equal(best_s3fd_face(boxes, np.array([0.7, 0.9])), boxes[1])
    assert best_s3fd_face(boxes, np.array([0.3, 0.45])) is None  # nothing above 0.5: no face


def test_s3fd_detector_runs_with_synthetic_weights_and_candidate_cap(synthetic_s3fd):
    # Exercises the code path only: synthetic S3FD weights find noise, not faces (never served).
    # Every anchor scores ~0.5, so thousands of candidates reach NMS; the cap keeps it fast.
    detector = S3FDDetector(synthetic_s3fd, torch.device("cpu"), batch_size=2)
    frames = np.random.default_rng(2).integers(0, 255, size=(3, 96, 128, 3), dtype=np.uint8)
    found = detector.detect(frames)
    outputs = detector.raw_outputs(frames[:1])
    n_candidates = len(s3fd_candidates(outputs)[0][1])
    assert n_candidates > S3FD_TOP_K  # the situation the cap is for
    assert len(found) == 3
    for box in found:
        assert box is None or (box.shape == (4,) and np.all(np.isfinite(box)) and np.all(box >= 0))
    assert detector.timings["network"] > 0 and detector.timings["postprocess"] > 0


def test_haar_finds_the_astronaut():
    from skimage import data
    photo = data.astronaut()
    (box,) = HaarDetector().detect(photo[None])
    assert box is not None
    # OpenCV's cascade box is (177, 66, 272, 161); ours lowers the bottom edge by 10% for the chin.
    assert box_iou(box, np.array([177, 66, 272, 161])) > 0.85
    assert box[3] > 161


def test_detect_boxes_scales_back_from_the_small_copy():
    from skimage import data
    photo = data.astronaut()
    (full,) = detect_boxes(HaarDetector(), photo[None], max_side=1024)
    (small,) = detect_boxes(HaarDetector(), photo[None], max_side=256)
    # same face, in full-size pixels both times (a coarser scan gives a slightly bigger box)
    assert box_iou(full, small) > 0.7
    centre = lambda b: np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    assert np.abs(centre(full) - centre(small)).max() < 8


def test_haar_finds_nothing_in_noise():
    noise = np.random.default_rng(3).integers(0, 255, size=(2, 120, 160, 3), dtype=np.uint8)
    assert HaarDetector().detect(noise) == [None, None]


def test_validate_box():
    assert list(validate_box((10, 20, 110, 140), 640, 360)) == [10, 20, 110, 140]
    for bad in [(600, 20, 700, 100), (-5, 0, 50, 50), (50, 50, 40, 90), (0, 0, 4, 4), None, (1, 2, 3)]:
        with pytest.raises(InvalidField) as err:
            validate_box(bad, 640, 360)
        assert err.value.status == 400 and err.value.field == "options.box"


def test_track_interpolates_holds_and_skips_misses():
    keyframes = {0: np.array([0, 0, 100, 100.0]), 10: np.array([20, 10, 120, 110.0]), 20: None}
    boxes = interpolate_track(keyframes, 25, smooth_window=1)
    assert np.allclose(boxes[5], [10, 5, 110, 105])       # halfway between the detections
    assert np.allclose(boxes[10:], [20, 10, 120, 110])    # held after the last face found
    assert track_keyframes(50, 5) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    with pytest.raises(ValueError):
        interpolate_track({0: None}, 5)


def test_smoothing_removes_a_spike_and_keeps_a_line():
    line = np.stack([np.arange(20.0)] * 4, axis=1)
    assert np.allclose(smooth_boxes(line, 5)[2:-2], line[2:-2])
    spiky = line.copy()
    spiky[10] += 50
    assert abs(smooth_boxes(spiky, 5)[10, 0] - line[10, 0]) <= 10 + 1e-9


def test_spread_frames_cover_first_and_last():
    assert spread_frames(50, 5) == [0, 12, 24, 37, 49]
    assert spread_frames(100, 5, start=50) == [50, 62, 74, 87, 99]
    assert spread_frames(1, 5) == [0] and spread_frames(3, 5) == [0, 1, 2] and spread_frames(10, 5, start=10) == []


def test_still_box_tolerates_jitter_not_movement():
    box = np.array([100, 100, 200, 200.0])
    jitter = [box + d for d in ([0, 0, 0, 0], [2, -1, 2, 1], [-2, 1, -1, -2], [1, 2, 1, 2])]
    assert np.allclose(still_box(jitter, 0.85, 0.05), np.median(np.stack(jitter), axis=0))
    moved = jitter + [box + [8, 0, 8, 0]]            # the centre 8 % of the side away: IoU 0.85, too far
    assert still_box(moved, 0.85, 0.05) is None
    grown = jitter + [np.array([90, 90, 210, 210.0])]  # same centre, 20 % larger: IoU 0.69
    assert still_box(grown, 0.85, 0.05) is None
    assert still_box([], 0.85, 0.05) is None


def _keyframes(found: list[int], missed: list[int]) -> dict:
    box = np.array([10, 10, 60, 60.0])
    return {**{i: box + i for i in found}, **{i: None for i in missed}}


def test_face_presence_bridges_short_gaps_and_leaves_long_ones():
    # faces at 0..20 (every 5th), misses 25..45, faces 50..60: a 29-frame gap, more than 12
    keyframes = _keyframes([0, 5, 10, 15, 20, 50, 55, 60], [25, 30, 35, 40, 45])
    present = face_presence(keyframes, 61, max_gap=12)
    assert frame_ranges(present) == [(0, 20), (50, 60)]
    # one missed keyframe between faces: a 9-frame gap, bridged
    present = face_presence(_keyframes([0, 5, 15, 20], [10]), 21, max_gap=12)
    assert present.all()
    # before the first face and after the last: no face, however short
    present = face_presence(_keyframes([5, 10], [0, 14]), 15, max_gap=12)
    assert frame_ranges(present) == [(5, 10)]
    assert not face_presence({0: None, 5: None}, 6, max_gap=12).any()


def test_refine_frames_asks_for_the_edges_of_stretches_that_pass_through():
    keyframes = _keyframes([0, 5, 10, 15, 20, 50, 55, 60], [25, 30, 35, 40, 45])
    assert refine_frames(keyframes, 61, max_gap=12) == [21, 22, 23, 24, 46, 47, 48, 49]
    assert refine_frames(_keyframes([0, 5, 15, 20], [10]), 21, max_gap=12) == []  # bridged anyway
    assert refine_frames(_keyframes([5, 10], [0, 14]), 15, max_gap=12) == [1, 2, 3, 4, 11, 12, 13]
    # once the edges are known, nothing more to ask
    refined = {**keyframes, **_keyframes([21, 22], [23, 24, 46, 47, 48]), 49: np.array([0, 0, 9, 9.0])}
    assert refine_frames(refined, 61, max_gap=12) == []
    assert frame_ranges(face_presence(refined, 61, max_gap=12)) == [(0, 22), (49, 60)]


def test_track_boxes_interpolate_through_bridges_and_smooth_within_stretches():
    keyframes = {0: np.array([0, 0, 100, 100.0]), 10: np.array([20, 10, 120, 110.0]), 12: None,
                 30: np.array([500, 0, 600, 100.0]), 40: np.array([500, 0, 600, 100.0])}
    present = face_presence(keyframes, 41, max_gap=5)  # 11..29 is too long a gap: two stretches
    assert frame_ranges(present) == [(0, 10), (30, 40)]
    boxes = track_boxes(keyframes, present, smooth_window=5)
    assert np.allclose(boxes[5], [10, 5, 110, 105])         # linear between detections
    assert np.allclose(boxes[30:], [500, 0, 600, 100])       # not smoothed across the jump
    assert boxes[10][0] <= 20 and boxes[9][0] >= 16             # the end of a stretch averages inside it
    with pytest.raises(ValueError):
        track_boxes({0: None}, np.zeros(3, bool))


def test_paste_mask_feathers_in_the_margin_below_the_chin():
    height, width, face = 120, 100, (0, 0, 100, 100)  # pads (0, 20, 0, 0): a 20-px margin below the face
    mask = paste_mask(height, width, face, torch.device("cpu"))[..., 0].numpy()
    centre = mask[:, width // 2]
    assert centre[:int(0.40 * height)].max() == 0                  # the upper face is left alone
    assert np.allclose(centre[int(0.58 * height) + 1:100], 1.0)    # full weight down to the chin (row 99)
    assert (np.diff(centre[100:]) < 0).all() and centre[-1] < 0.05  # fades across the margin only
    # no margin to feather in (no bottom pad): the fall happens inside, over the last 8 %
    tight = paste_mask(100, 100, (0, 0, 100, 100), torch.device("cpu"))[..., 0].numpy()[:, 50]
    assert tight[90] == 1.0 and tight[-1] < 0.1
    # side margins (pads left/right) are feathered in too
    sides = paste_mask(100, 140, (20, 0, 120, 100), torch.device("cpu"))[..., 0].numpy()[80]
    assert np.allclose(sides[20:120], 1.0) and sides[0] < 0.05 and sides[-1] < 0.05
    assert MIN_FEATHER_PX <= 20


def test_padded_crop_boxes_clip_to_frame():
    boxes = np.array([[10, 5, 100, 90], [600, 300, 640, 360]])
    crops = padded_crop_boxes(boxes, (0, 20, 0, 0), 640, 360)
    assert crops[0].tolist() == [10, 5, 100, 110]
    assert crops[1].tolist() == [600, 300, 640, 360]  # bottom pad clipped at the frame's edge
    crops = padded_crop_boxes(np.array([[0, 0, 50, 50]]), (30, 0, 30, 0), 640, 360)
    assert crops[0].tolist() == [0, 0, 50, 50]
