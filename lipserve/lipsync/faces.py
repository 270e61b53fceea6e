"""Face boxes for lip sync: the box arithmetic of the modes and the second look.

Boxes are float or int arrays `(x1, y1, x2, y2)` in pixels of the frame they were found in.

Modes (the planner decides which frames to detect on; this module supplies the arithmetic):
  auto    a few detections spread over the frames used; one box if they agree (a still head),
          else `track`
  static  one box for every frame (the first of a few tries spread over the frames used)
  track   detections on every k-th frame (and the last), linearly interpolated in between and
          lightly smoothed; frames without a face are bridged when the gap is short, else left
          untouched (see face_presence)
  box     a box the caller gives, validated against the frame
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import InvalidField
from .detectors import FaceDetector

# ----------------------------------------------------------------------------- the second look

# A frame the first pass left without a face gets a second look before it passes through:
# the lenient detector at full resolution, near the face of the frame next to it, upright and
# tilted (the frontal cascade loses heads tilted by more than ~15 degrees).
SECOND_LOOK_TILTS = (0.0, -15.0, 15.0, -30.0, 30.0)
SEARCH_MARGIN = 1.0   # the window searched around the neighbour's box: its side again on every side
NEXT_MAX_SHIFT = 0.5  # from one frame to the next a face's centre moves at most half its side ...
NEXT_MAX_SCALE = 1.5  # ... and its side changes by at most this factor
AGREE_FRAMES = 3      # with no face next to it, a lenient hit counts once this many frames in a row agree
LOOK_CHUNK = 32       # frames fetched at once for the second look


def continues(previous: np.ndarray, box: np.ndarray, max_shift: float = NEXT_MAX_SHIFT,
              max_scale: float = NEXT_MAX_SCALE) -> bool:
    """Whether `box` can be the face of `previous` a frame later (or a few frames apart)."""
    side = float(max(previous[2] - previous[0], previous[3] - previous[1]))
    new_side = float(max(box[2] - box[0], box[3] - box[1]))
    shift = np.hypot(*((box[:2] + box[2:]) / 2 - (previous[:2] + previous[2:]) / 2))
    return shift <= max_shift * side and 1 / max_scale <= new_side / max(side, 1e-6) <= max_scale


def find_near(detector: FaceDetector, frame: np.ndarray, anchor: np.ndarray) -> np.ndarray | None:
    """The lenient detector in a window around `anchor` (the face of a neighbouring frame), upright
    and then tilted; the first box that `continues` the anchor, in frame pixels."""
    height, width = frame.shape[:2]
    side = float(max(anchor[2] - anchor[0], anchor[3] - anchor[1]))
    margin = side * SEARCH_MARGIN
    x1, y1 = int(max(0, anchor[0] - margin)), int(max(0, anchor[1] - margin))
    x2, y2 = int(min(width, anchor[2] + margin)), int(min(height, anchor[3] + margin))
    if x2 - x1 < 8 or y2 - y1 < 8:
        return None
    window = np.ascontiguousarray(frame[y1:y2, x1:x2])
    pivot = (float((anchor[0] + anchor[2]) / 2 - x1), float((anchor[1] + anchor[3]) / 2 - y1))
    for tilt in SECOND_LOOK_TILTS:
        turn = cv2.getRotationMatrix2D(pivot, tilt, 1.0)
        view = window if tilt == 0 else cv2.warpAffine(window, turn, (x2 - x1, y2 - y1),
                                                       borderMode=cv2.BORDER_REPLICATE)
        (box,) = detector.detect_lenient(view[None])
        if box is None:
            continue
        centre = (box[:2] + box[2:]) / 2
        if tilt != 0:  # the centre turned back; the size as found
            centre = cv2.invertAffineTransform(turn) @ np.array([centre[0], centre[1], 1.0])
        half = (box[2:] - box[:2]) / 2
        found = np.concatenate([centre - half, centre + half]) + np.array([x1, y1, x1, y1], dtype=np.float64)
        if continues(anchor, found):
            return found
    return None


def second_look(detector: FaceDetector, keyframes: dict[int, np.ndarray | None], n_frames: int, max_gap: int,
                frames_for) -> int:
    """Before a stretch of frames [0, n_frames) is declared face-less, look at every frame of it again.

    From the face on either side of the stretch, frame by frame inwards: `find_near` (the face
    moved a little, tilted, or the first pass's smaller copy lost it). What neither side reaches:
    the lenient detector on the whole picture, believed where AGREE_FRAMES frames in a row agree;
    those faces are then followed outwards the same way. Found boxes go into `keyframes` (source
    pixels); what stays face-less passes through. `frames_for(indices) -> (frames, scale)` as in
    the planner (source pixels = frame pixels * scale). Returns the number of frames looked at.
    """
    looked = 0
    tried_unanchored: set[int] = set()
    looked_at: set[tuple[int, int]] = set()  # stretches already followed into: a later round skips them
    for _ in range(4):  # new faces in the middle of a stretch are followed outwards on the next round
        present = face_presence(keyframes, n_frames, max_gap)
        if not present.any():  # no face anywhere yet: the frames already tried, whole
            n = _unanchored(detector, keyframes, sorted(keyframes), frames_for, tried_unanchored)
            looked += n
            if n == 0 or not face_presence(keyframes, n_frames, max_gap).any():
                return looked
            continue
        boxes = interpolate_track(keyframes, n_frames, smooth_window=1)
        added = 0
        for first, last in frame_ranges(~present):
            if (first, last) in looked_at:
                continue
            looked_at.add((first, last))
            reached_from_before = reached_from_after = 0
            if first > 0:
                reached_from_before, n = _follow(detector, keyframes, list(range(first, last + 1)),
                                                 boxes[first - 1], frames_for)
                looked += n
            rest = list(range(first + reached_from_before, last + 1))
            if last < n_frames - 1 and rest:
                reached_from_after, n = _follow(detector, keyframes, rest[::-1], boxes[last + 1], frames_for)
                looked += n
            middle = rest[:len(rest) - reached_from_after]
            added += reached_from_before + reached_from_after
            found_before = sum(keyframes.get(i) is not None for i in middle)
            looked += _unanchored(detector, keyframes, middle, frames_for, tried_unanchored)
            added += sum(keyframes.get(i) is not None for i in middle) - found_before
        if not added:
            break
    return looked


def look_again_whole(detector: FaceDetector, keyframes: dict[int, np.ndarray | None], frames_for) -> int:
    """The lenient detector on the whole of every frame tried so far (static mode found no face)."""
    return _unanchored(detector, keyframes, sorted(keyframes), frames_for, set())


def _fetch(frames_for, indices: list[int]):
    """(index, frame, scale) in the order asked, LOOK_CHUNK frames decoded at a time."""
    for start in range(0, len(indices), LOOK_CHUNK):
        chunk = indices[start:start + LOOK_CHUNK]
        order = sorted(chunk)
        frames, scale = frames_for(order)
        by_index = dict(zip(order, frames))
        for i in chunk:
            yield i, by_index[i], scale


def _follow(detector, keyframes, order: list[int], anchor: np.ndarray, frames_for) -> tuple[int, int]:
    """Follow the face at `anchor` through the frames in `order` until it is lost: (frames found, looked at)."""
    found = looked = 0
    for i, frame, scale in _fetch(frames_for, order):
        looked += 1
        box = find_near(detector, frame, np.asarray(anchor, dtype=np.float64) / scale)
        if box is None:
            break
        anchor = box * scale
        keyframes[i] = anchor
        found += 1
    return found, looked


def _unanchored(detector, keyframes, indices: list[int], frames_for, tried: set[int]) -> int:
    """The lenient detector on whole frames with no face next to them; a box is kept only inside
    a run of AGREE_FRAMES consecutive `indices` whose boxes continue one another (all of them when
    fewer are looked at: a photo). Returns frames looked at."""
    indices = [i for i in indices if i not in tried]
    if not indices:
        return 0
    tried.update(indices)
    hits = [(i, None if box is None else box * scale)
            for i, frame, scale in _fetch(frames_for, indices)
            for box in detector.detect_lenient(frame[None])]
    needed = min(AGREE_FRAMES, len(tried))
    run: list[tuple[int, np.ndarray]] = []
    for i, box in hits + [(-1, None)]:
        if box is not None and (not run or continues(run[-1][1], box)):
            run.append((i, box))
            continue
        if len(run) >= needed:
            keyframes.update(dict(run))
        run = [(i, box)] if box is not None else []
    return len(hits)


# ----------------------------------------------------------------------------- box arithmetic

def validate_box(box: Sequence[int] | None, width: int, height: int) -> np.ndarray:
    """A caller-given (x1, y1, x2, y2): inside the frame and at least 8 px each way, else InvalidField."""
    if box is None or len(box) != 4:
        raise InvalidField("face_mode 'box' needs options.box = (x1, y1, x2, y2) in source pixels", field="options.box")
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InvalidField(
            f"options.box ({x1}, {y1}, {x2}, {y2}) is not inside the {width}x{height} frame "
            "(need 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height)", field="options.box")
    if x2 - x1 < 8 or y2 - y1 < 8:
        raise InvalidField(f"options.box ({x1}, {y1}, {x2}, {y2}) is smaller than 8x8 pixels", field="options.box")
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def track_keyframes(n_frames: int, every: int) -> list[int]:
    """Frames `track` mode detects on: 0, k, 2k, ... below n_frames."""
    return list(range(0, n_frames, max(1, every)))


def spread_frames(n_frames: int, count: int, start: int = 0) -> list[int]:
    """`count` frames spread evenly over [start, n_frames), the first and the last included."""
    if n_frames <= start:
        return []
    return sorted({int(round(v)) for v in np.linspace(start, n_frames - 1, max(1, count))})


def still_box(boxes: Sequence[np.ndarray], min_iou: float, max_shift: float) -> np.ndarray | None:
    """The one box for a head that does not move, or None when these detections say it moves.

    The box is the per-coordinate median of the detections (robust to one odd detection); the
    head counts as still when every detection overlaps it by IoU >= min_iou and its centre lies
    within max_shift of the box's side from the box's centre.
    """
    if not boxes:
        return None
    stacked = np.stack([np.asarray(b, dtype=np.float64) for b in boxes])
    reference = np.median(stacked, axis=0)
    side = ((reference[2] - reference[0]) + (reference[3] - reference[1])) / 2
    centre = (reference[:2] + reference[2:]) / 2
    for box in stacked:
        shift = np.hypot(*((box[:2] + box[2:]) / 2 - centre))
        if box_iou(box, reference) < min_iou or shift > max_shift * side:
            return None
    return reference


def face_presence(keyframes: dict[int, np.ndarray | None], n_frames: int, max_gap: int) -> np.ndarray:
    """[n_frames] bool: which frames get a face box, from the frames detected on.

    Between two detected faces with no miss in between: face (the box is interpolated). A stretch
    of misses between two faces is bridged when at most `max_gap` frames lie between them (a
    detector's miss, a hand passing), else those frames have no face. Before the first and after
    the last detected face: no face. The caller detects on the frames next to each change so the
    stretches are exact (refine_frames).
    """
    present = np.zeros(n_frames, dtype=bool)
    known = sorted((i, b is not None) for i, b in keyframes.items() if i < n_frames)
    found = [i for i, ok in known if ok]
    if not found:
        return present
    missed = [i for i, ok in known if not ok]
    for a, b in zip(found, found[1:]):
        misses_between = any(a < m < b for m in missed)
        if not misses_between or b - a - 1 <= max_gap:
            present[a:b + 1] = True
    present[found] = True
    return present


def refine_frames(keyframes: dict[int, np.ndarray | None], n_frames: int, max_gap: int) -> list[int]:
    """Frames to detect on so that every face / no-face change face_presence acts on is known to the
    frame: all frames between a found and a missed neighbour, except at the edges of a run of misses
    short enough to be bridged whatever its exact edges."""
    known = sorted((i, b is not None) for i, b in keyframes.items() if i < n_frames)
    found = [i for i, ok in known if ok]
    wanted: set[int] = set()
    for (i, face_at_i), (j, face_at_j) in zip(known, known[1:]):
        if face_at_i == face_at_j or j - i <= 1:
            continue
        if face_at_i:  # a face, then misses: the run of misses ends at the next face, if any
            before, after = i, next((f for f in found if f > j), None)
        else:          # misses, then a face: the run started after the previous face, if any
            before, after = next((f for f in reversed(found) if f < i), None), j
        if before is not None and after is not None and after - before - 1 <= max_gap:
            continue
        wanted.update(range(i + 1, j))
    return sorted(wanted)


def track_boxes(keyframes: dict[int, np.ndarray | None], present: np.ndarray, smooth_window: int = 5) -> np.ndarray:
    """[n, 4] boxes: linear between found keyframes (through bridged gaps), then a centred moving
    average over `smooth_window` frames within each stretch of face frames (never across a stretch
    without a face). Rows where present is False hold the nearest box; they are not drawn on."""
    boxes = interpolate_track(keyframes, len(present), smooth_window=1)  # linear only
    for first, last in frame_ranges(np.asarray(present, dtype=bool)):
        boxes[first:last + 1] = smooth_boxes(boxes[first:last + 1], smooth_window)
    return boxes


def frame_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (first, last) index ranges where mask is True."""
    ranges, start = [], None
    for i, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            ranges.append((start, i - 1))
            start = None
    return ranges


def interpolate_track(keyframes: dict[int, np.ndarray | None], n_frames: int, smooth_window: int = 5) -> np.ndarray:
    """Per-frame boxes [n_frames, 4] from the keyframes where a face was found.

    Linear in between, held before the first and after the last found face, then a centred
    moving average over `smooth_window` frames (the window shrinks at the ends).
    """
    found = sorted((i, b) for i, b in keyframes.items() if b is not None)
    if not found:
        raise ValueError("no keyframe has a face")
    xs = np.array([i for i, _ in found], dtype=np.float64)
    ys = np.stack([b for _, b in found]).astype(np.float64)
    frames = np.arange(n_frames, dtype=np.float64)
    boxes = np.stack([np.interp(frames, xs, ys[:, c]) for c in range(4)], axis=1)  # np.interp holds at the ends
    return smooth_boxes(boxes, smooth_window)


def smooth_boxes(boxes: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(boxes) < 2:
        return boxes
    half = window // 2
    cumulative = np.vstack([np.zeros((1, 4)), np.cumsum(boxes, axis=0)])
    lo = np.clip(np.arange(len(boxes)) - half, 0, len(boxes))
    hi = np.clip(np.arange(len(boxes)) + half + 1, 0, len(boxes))
    return (cumulative[hi] - cumulative[lo]) / (hi - lo)[:, None]


def padded_crop_boxes(boxes: np.ndarray, pads: Sequence[int], width: int, height: int) -> np.ndarray:
    """Integer crop windows: the face box grown by pads (top, bottom, left, right), clipped to the frame.

    Always at least 2x2 pixels, so a crop can never be empty.
    """
    top, bottom, left, right = pads
    b = np.round(np.asarray(boxes, dtype=np.float64)).astype(np.int64)
    x1 = np.clip(b[:, 0] - left, 0, width - 2)
    y1 = np.clip(b[:, 1] - top, 0, height - 2)
    x2 = np.clip(b[:, 2] + right, x1 + 2, width)
    y2 = np.clip(b[:, 3] + bottom, y1 + 2, height)
    return np.stack([x1, y1, x2, y2], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, continuous areas (for tests and tracking checks)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
