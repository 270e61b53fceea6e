"""FacePlanner: where the face is on each source frame a request uses, in the mode it asked for.

It finds the face on a few frames spread over the answer and keeps one box when the head is still
(`auto`, the default), tracks it on every k-th frame when it moves (`track`), finds it once
(`static`) or takes it from the caller (`box`), instead of running the detector on every output
frame. It remembers the face boxes per video (keyed by its SourceVideo's hash), so the
same video with a new sentence skips detection; a later, longer answer detects only the frames
the remembered boxes do not cover. Without frames from the caller it decodes only the frames a
detection needs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .. import media
from ..cache import LRUCache, content_key
from ..errors import InvalidMedia, NoFaceFound
from ..media import SourceVideo, VideoInfo
from ..settings import Settings
from .detectors import FaceDetector, detect_boxes
from .faces import (face_presence, look_again_whole, refine_frames, second_look, spread_frames, still_box,
                    track_boxes, track_keyframes, validate_box)
from .options import LipSyncOptions

log = logging.getLogger("lipserve.lipsync")

STATIC_MAX_SIDE = 640  # static mode detects once, so it can afford a sharper copy
TRACK_MAX_SIDE = 480   # track and auto detect often, on a smaller copy (Haar misses faces under ~40 px)
STATIC_TRIES = 5       # static mode: frames tried, spread over the frames used, before giving up
SMOOTH_WINDOW = 5      # track: moving average over this many frames, as the official script smooths boxes
# auto: AUTO_PROBES detections spread over the frames used (first and last included: 4 more than
# static's one). The head counts as still, and keeps one box, when every probe's box overlaps the
# median box by IoU >= AUTO_MIN_IOU and its centre is within AUTO_MAX_SHIFT of the box's side.
# Why these: a box off by a share f of its side has IoU (1-f)/(1+f) with the face, so 0.85 allows
# a drift of ~8 % (the mouth moves ~8 px in Wav2Lip's 96-px input), and the centre bound tightens
# that to 5 % (~5 px); scale changes show in the IoU (0.85 = sides 8 % apart). A still head's
# detections agree far better than that (the test clips: IoU >= 0.98, centre within 0.6 %; S3FD on
# real video jitters by a few %), so still heads are not sent to tracking by detector noise, while
# the ~50 px/s head of the issue (a shift of ~45 % of the box over 2 s) goes to track.
AUTO_PROBES = 5
AUTO_MIN_IOU = 0.85
AUTO_MAX_SHIFT = 0.05
MAX_BRIDGE_SECONDS = 0.5  # a stretch without a face up to this long, between two faces, gets an interpolated box
DECODE_WINDOW_BYTES = 512 * 1024 * 1024  # the planner decodes at most this much at once


@dataclass
class FacePlan:
    """The video branch's product: small and picklable (no frames)."""

    video_key: str                  # SourceVideo.key
    info: VideoInfo
    boxes: np.ndarray               # [covered, 4] int (x1, y1, x2, y2) per source frame [0, covered), source pixels
    present: np.ndarray             # [covered] bool: the frame has a face (False: passed through untouched)
    detector: str                   # "s3fd" | "haar" | "given"
    mode: str                       # how the boxes were settled: static | track | box | auto/still | auto/track
    detected_frames: int            # detector runs in this call (0 on a cache hit)
    cached: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FaceEntry:
    """What the face cache remembers about one (video, mode, options) combination."""

    info: VideoInfo
    detector: str
    keyframes: dict  # source frame -> box (source pixels) or None where no face was found
    covered: int     # source frames whose boxes are settled
    moving: bool = False  # auto: the probes saw the head move or miss, so it is tracked


@dataclass(frozen=True)
class FaceLookup:
    """A request's first step on faces: its cache keys, what the cache holds and the video's probe."""

    options: LipSyncOptions         # resolved and checked
    video_key: str
    entry_key: str
    entry: FaceEntry | None         # None: not cached (or the cache not used)
    info: VideoInfo
    use_cache: bool
    given: FacePlan | None = None   # a plan made earlier for this video, if the caller has one


def frames_from(frames: np.ndarray, resize_factor: int):
    """Frame source over already-decoded (possibly downscaled) frames; boxes scale back by the factor."""
    def get(indices: list[int]) -> tuple[np.ndarray, float]:
        return frames[indices], float(resize_factor)
    return get


class FacePlanner:
    """Face boxes per request: the modes, the face cache and the decoding detection needs."""

    def __init__(self, settings: Settings, detector: FaceDetector):
        self.settings = settings
        self.detector = detector
        self.cache: LRUCache[FaceEntry] = LRUCache(settings.lipsync.face_cache_size)

    def clear_cache(self) -> None:
        self.cache = LRUCache(self.settings.lipsync.face_cache_size)

    def plan(self, video: SourceVideo, options: LipSyncOptions, frames_needed: int | None = None, frames_for=None, *,
             use_cache: bool = True) -> FacePlan:
        """Face boxes for source frames [0, frames_needed) (all if None).

        `options` resolved and checked (LipSyncer.resolve, check_options). `frames_for(indices) ->
        (frames, scale)` gives the frames to detect on (source pixels = frame pixels * scale); by
        default they are decoded from `video`. `use_cache=False` neither reads nor fills the cache."""
        lookup = self.look_up(video, options, use_cache=use_cache)
        timings = {"decode": 0.0, "detect": 0.0}
        info = lookup.info
        want = info.n_frames if frames_needed is None else max(1, min(int(frames_needed), info.n_frames))
        plan = self.settle(lookup, want, frames_for or self._frames_by_decoding(video.data, timings, info), timings)
        plan.timings = timings
        return plan

    def look_up(self, video: SourceVideo, options: LipSyncOptions, *, use_cache: bool = True,
                given: FacePlan | None = None) -> FaceLookup:
        """The cache entry for this video and options. `given`, a plan made earlier, is kept for
        `settle` when it is for this video."""
        entry_key = self._entry_key(video.key, options)
        if given is not None and given.video_key != video.key:
            log.warning("ignoring a face plan made for another video")
            given = None
        entry = self.cache.get(entry_key) if use_cache else None
        return FaceLookup(options, video.key, entry_key, entry, video.info, use_cache, given)

    def settle(self, lookup: FaceLookup, want: int, frames_for, timings: dict) -> FacePlan:
        """The boxes of source frames [0, want): the given plan where it covers them, else the cache
        entry, extended by detection on `frames_for` where it falls short (and cached again)."""
        if lookup.given is not None and len(lookup.given.boxes) >= want:
            return lookup.given
        entry, detected = lookup.entry, 0
        if entry is None or entry.covered < want:
            entry, detected = self._extend(entry, lookup.info, lookup.options, want, frames_for, timings)
            if lookup.use_cache:
                self.cache.put(lookup.entry_key, entry)
        boxes, present, mode = self._layout(entry, lookup.options, want)
        return FacePlan(
            video_key=lookup.video_key, info=lookup.info, boxes=boxes, present=present, detector=entry.detector,
            mode=mode, detected_frames=detected, cached=lookup.entry is not None and detected == 0,
        )

    # ------------------------------------------------------------------ keys and frames

    def _entry_key(self, video_key: str, options: LipSyncOptions) -> str:
        parts = [options.face_mode, str(options.resize_factor), self.detector.name]
        if options.face_mode == "box":
            parts.append(repr(tuple(int(v) for v in options.box)) if options.box is not None else "none")
        if options.face_mode in ("track", "auto"):
            parts.append(str(options.track_every))
        return content_key(video_key.encode(), *parts)

    @staticmethod
    def _frames_by_decoding(video: bytes, timings: dict, info: VideoInfo):
        """Frame source that decodes just up to the last frame asked for.

        Frames are kept only where a detection needs them; a long or large source is decoded in
        windows of at most DECODE_WINDOW_BYTES (each window seeks to its keyframe) so the whole
        clip never sits in memory at once.
        """
        frame_bytes = max(1, info.width * info.height * 3)
        window = max(1, DECODE_WINDOW_BYTES // frame_bytes)

        def get(indices: list[int]) -> tuple[np.ndarray, float]:
            t = time.perf_counter()
            picked: dict[int, np.ndarray] = {}
            last = None
            stop = max(indices) + 1
            for start in range(0, stop, window):
                if not any(start <= i < start + window for i in indices):
                    continue  # no detection in this stretch: do not decode it
                decoded = media.decode_frames(video, count=min(window, stop - start), start=start)
                if len(decoded) == 0:
                    break
                last = decoded[-1]
                picked.update({i: decoded[i - start] for i in indices if start <= i < start + len(decoded)})
            if last is None:
                raise InvalidMedia("the video stream holds no decodable frame")
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t
            # frames past the end of a stream shorter than its header says: its last frame
            return np.stack([picked.get(i, last) for i in indices]), 1.0
        return get

    # ------------------------------------------------------------------ the modes

    def _extend(self, entry: FaceEntry | None, info: VideoInfo, options: LipSyncOptions, want: int,
                frames_for, timings: dict) -> tuple[FaceEntry, int]:
        """Settle face boxes for frames [0, want), detecting only what the entry lacks."""
        mode = options.face_mode
        if mode == "box":
            box = validate_box(options.box, info.width, info.height)
            return FaceEntry(info, "given", {0: box}, info.n_frames), 0

        keyframes = dict(entry.keyframes) if entry is not None else {}
        detected = 0
        if info.n_frames == 1:  # a photo: its one detection can afford the whole picture
            static_side = track_side = max(info.width, info.height)
        else:
            static_side, track_side = STATIC_MAX_SIDE, TRACK_MAX_SIDE

        def detect(indices, max_side: int) -> None:
            nonlocal detected
            indices = sorted(set(i for i in indices if i not in keyframes))
            if not indices:
                return
            frames, scale = frames_for(indices)
            t = time.perf_counter()
            boxes = detect_boxes(self.detector, frames, max_side)
            timings["detect"] = timings.get("detect", 0.0) + time.perf_counter() - t
            detected += len(indices)
            for i, b in zip(indices, boxes):
                keyframes[i] = None if b is None else b * scale

        if mode == "static":
            if any(b is not None for b in keyframes.values()):
                return replace(entry, covered=info.n_frames), 0
            for i in spread_frames(want, STATIC_TRIES):  # one at a time: the first face ends the search
                detect([i], static_side)
                if keyframes[i] is not None:
                    break
            if not any(b is not None for b in keyframes.values()):
                t = time.perf_counter()
                detected += look_again_whole(self.detector, keyframes, frames_for)
                timings["detect"] = timings.get("detect", 0.0) + time.perf_counter() - t
            self._require_a_face(keyframes)
            return FaceEntry(info, self.detector.name, keyframes, info.n_frames), detected

        moving = entry.moving if entry is not None else False
        if mode == "auto" and not moving:
            covered = entry.covered if entry is not None else 0
            detect(spread_frames(want, AUTO_PROBES, start=covered), track_side)
            probes = [keyframes[i] for i in sorted(keyframes)]
            if all(b is not None for b in probes) and still_box(probes, AUTO_MIN_IOU, AUTO_MAX_SHIFT) is not None:
                return FaceEntry(info, self.detector.name, keyframes, want), detected
            log.debug("auto face mode: the head moves or leaves the picture; tracking it")

        # track (and auto, once the head moved or went missing): every k-th frame and the last,
        # then the frames around each appearance / disappearance, so those are exact
        max_gap = _max_gap(info)
        detect(track_keyframes(want, options.track_every) + [want - 1], track_side)
        detect(refine_frames(keyframes, want, max_gap), track_side)
        detected += self._second_look(keyframes, want, max_gap, frames_for, timings)
        self._require_a_face(keyframes)
        return FaceEntry(info, self.detector.name, keyframes, want, moving=True), detected

    def _second_look(self, keyframes: dict, want: int, max_gap: int, frames_for, timings: dict) -> int:
        """faces.second_look over frames [0, want): nothing passes through, and no 422 is given,
        before every frame that would has been looked at again."""
        t = time.perf_counter()
        decode_before = timings.get("decode", 0.0)
        looked = second_look(self.detector, keyframes, want, max_gap, frames_for)
        timings["detect"] = (timings.get("detect", 0.0) + time.perf_counter() - t
                             - (timings.get("decode", 0.0) - decode_before))
        return looked

    def _require_a_face(self, keyframes: dict) -> None:
        if any(b is not None for b in keyframes.values()):
            return
        tried = sorted(keyframes)
        shown = ", ".join(str(i) for i in tried[:8]) + (", ..." if len(tried) > 8 else "")
        raise NoFaceFound(
            f"no face found in the source video ({self.detector.name} detector, checked "
            f"{len(tried)} frame(s): {shown}). Use a video with a clearly visible frontal face, "
            "or give the face's position with face_mode='box'.")

    @staticmethod
    def _layout(entry: FaceEntry, options: LipSyncOptions, n: int) -> tuple[np.ndarray, np.ndarray, str]:
        """([n, 4] int boxes in source pixels, [n] bool face present, mode used) for frames [0, n)."""
        mode = options.face_mode
        found = [b for _, b in sorted(entry.keyframes.items()) if b is not None]
        if mode in ("track", "auto") and (mode == "track" or entry.moving):
            # laid out over every settled frame, then cut: a shorter answer gets the same boxes
            present = face_presence(entry.keyframes, max(n, entry.covered), _max_gap(entry.info))
            boxes = track_boxes(entry.keyframes, present, SMOOTH_WINDOW)[:n]
            present = present[:n]
            used = "track" if mode == "track" else "auto/track"
        else:
            if mode == "auto":
                box, used = np.median(np.stack(found), axis=0), "auto/still"
            else:
                box, used = found[0], mode
            boxes = np.repeat(np.asarray(box, dtype=np.float64)[None], n, axis=0)
            present = np.ones(n, dtype=bool)
        return np.round(boxes).astype(np.int64), present, used


def _max_gap(info: VideoInfo) -> int:
    return int(MAX_BRIDGE_SECONDS * info.fps + 1e-6)
