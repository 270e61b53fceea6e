"""LipSyncer: the source video + the final speech -> the video with the mouth redrawn in sync.

What it does differently from the official inference script, and why:
  * decodes only the source frames the speech needs (min(output frames, source frames)),
    not the whole video;
  * finds the face once (`static`), on every k-th frame (`track`), or takes it from the caller
    (`box`), instead of running the detector on every output frame;
  * remembers the probe and the face boxes per video (keyed by a hash of its bytes), so the
    same video with a new sentence skips detection;
  * when the speech outlasts the video, plays the video back and forth (0..n-1, n-2..1, 0, ...)
    instead of jumping back to frame 0;
  * gives one output frame per 1/fps of speech, so the output lasts as long as the audio
    (the official loop stops ~0.2 s early);
  * crops, resizes and blends on the model's device, and encodes in memory with the speech.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.signal
import torch

from .. import media
from ..audio.wav2lip_mel import MEL_FRAMES_PER_SECOND, MEL_STEP, SAMPLE_RATE, melspectrogram
from ..cache import LRUCache, content_key
from ..device import autocast_dtype, pick_device
from ..errors import (InputTooLarge, InvalidAudio, InvalidField, InvalidMedia, NoFaceFound, ResolutionTooLarge,
                      VideoTooLong)
from ..media import VideoInfo
from ..settings import Settings
from . import blend
from .faces import (FaceDetector, HaarDetector, S3FDDetector, detect_boxes, interpolate_track,
                    padded_crop_boxes, track_keyframes, validate_box)
from .networks import load_s3fd, load_wav2lip, wav2lip_filename

log = logging.getLogger("lipserve.lipsync")

FACE_MODES = ("static", "track", "box")
STATIC_MAX_SIDE = 640  # static mode detects once, so it can afford a sharper copy
TRACK_MAX_SIDE = 480   # track mode detects often, on a smaller copy (Haar misses faces under ~40 px)
STATIC_TRIES = 5       # static mode: frames tried (0, then every half second) before giving up
CPU_BATCH_SIZE = 16    # Wav2Lip on CPU: 55 ms/frame at 16, slower at 64 (FACTS.md)
CUDA_BYTES_PER_ITEM = 64 * 1024 * 1024  # generous fp16 activation budget per 96x96 sample
CUDA_MAX_BATCH = 128
DECODE_WINDOW_BYTES = 512 * 1024 * 1024  # plan_faces decodes at most this much at once


@dataclass
class LipSyncOptions:
    face_mode: str = "static"           # static | track | box
    box: tuple[int, int, int, int] | None = None   # x1, y1, x2, y2 in source pixels
    pads: tuple[int, int, int, int] = (0, 20, 0, 0)  # top, bottom, left, right
    resize_factor: int = 1
    track_every: int = 5


@dataclass
class FacePlan:
    """The video branch's product: small and picklable (no frames)."""

    video_key: str                  # content_key(video bytes)
    info: VideoInfo
    boxes: np.ndarray               # [covered, 4] int (x1, y1, x2, y2) per source frame [0, covered), source pixels
    detector: str                   # "s3fd" | "haar" | "given"
    detected_frames: int            # detector runs in this call (0 on a cache hit)
    cached: bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SyncResult:
    mp4: bytes
    duration_s: float
    n_frames: int
    decoded_frames: int
    detected_frames: int
    timings: dict[str, float]       # decode, detect, mel, model, paste, encode
    synthetic_weights: bool
    face_cache_hit: bool


@dataclass(frozen=True)
class _FaceEntry:
    """What the face cache remembers about one (video, mode, options) combination."""

    info: VideoInfo
    detector: str
    keyframes: dict  # source frame -> box (source pixels) or None where no face was found
    covered: int     # source frames whose boxes are settled


def pingpong_indices(n_out: int, n_src: int) -> np.ndarray:
    """Source frame for each output frame: 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... (no jump back to 0)."""
    if n_src <= 1:
        return np.zeros(n_out, dtype=np.int64)
    period = 2 * (n_src - 1)
    phase = np.arange(n_out, dtype=np.int64) % period
    return np.where(phase < n_src, phase, period - phase)


def output_mel_starts(n_mel_frames: int, n_out: int, fps: float) -> np.ndarray:
    """First mel frame of each output frame's 16-frame window: int(i * 80 / fps) as the official
    loop, but one window per output frame, the tail ones held flush with the end of the speech."""
    starts = np.array([int(i * (MEL_FRAMES_PER_SECOND / fps)) for i in range(n_out)], dtype=np.int64)
    return np.minimum(starts, max(0, n_mel_frames - MEL_STEP))


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return audio
    g = math.gcd(int(sample_rate), SAMPLE_RATE)
    return scipy.signal.resample_poly(audio, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)


class LipSyncer:
    """Loads Wav2Lip (and S3FD when its file is there) once; `plan_faces` and `sync` per request."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.model, self.synthetic_weights = load_wav2lip(settings, self.device)
        if self.synthetic_weights:
            log.warning("LIP SYNC ON SYNTHETIC WEIGHTS: %s is missing; every result is flagged "
                        "synthetic_weights=true and its mouths are NOT meaningful", wav2lip_filename(settings))
        self.autocast = autocast_dtype(self.device, settings.precision)
        # crop/blend with torch ops on an accelerator, with cv2 on CPU (see blend.py)
        self.tensor_ops = self.device.type != "cpu"
        # the fast graphs (lipserve.fast) where the settings and their bounds allow, else the eager modules
        from ..fast import fast_s3fd, fast_wav2lip

        threads, cache = settings.cpu_threads(), settings.fast_cache_dir
        self.lip_model, report = fast_wav2lip(self.model, settings.wav2lip_backend, self.device, threads, cache)
        self.fast_paths = {"wav2lip": report.as_dict()}
        s3fd = load_s3fd(settings, self.device)
        if s3fd is not None:
            s3fd, report = fast_s3fd(s3fd, settings.s3fd_backend, self.device, threads, cache)
            self.fast_paths["s3fd"] = report.as_dict()
        self.detector: FaceDetector = S3FDDetector(s3fd, self.device) if s3fd is not None else HaarDetector()
        if s3fd is None:
            log.info("s3fd.pth not in %s: faces are found with OpenCV's Haar cascade", settings.weights_dir)
        self.face_cache: LRUCache[_FaceEntry] = LRUCache(settings.face_cache_size)
        self._model_lock = threading.Lock()  # one forward at a time per replica keeps memory bounded

    # ------------------------------------------------------------------ public

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "checkpoint": wav2lip_filename(self.settings),
            "synthetic_weights": self.synthetic_weights,
            "face_detector": self.detector.name,
            "precision": str(self.autocast).replace("torch.", "") if self.autocast else "fp32",
            "batch_size": self.batch_size(),
            "face_cache": self.face_cache.stats(),
            "fast_paths": self.fast_paths,
        }

    def clear_face_cache(self) -> None:
        self.face_cache = LRUCache(self.settings.face_cache_size)

    def batch_size(self) -> int:
        """Samples per Wav2Lip forward: from free memory on CUDA, a fixed sane size on CPU."""
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(CUDA_MAX_BATCH, 0.5 * free // CUDA_BYTES_PER_ITEM)))

    def plan_faces(self, video: bytes, options: LipSyncOptions, frames_needed: int | None = None) -> FacePlan:
        """Probe (+ limits) and face boxes for source frames [0, frames_needed) (all if None)."""
        t0 = time.perf_counter()
        self._check_options(options)
        video_key, entry_key = self._keys(video, options)
        entry = self.face_cache.get(entry_key)
        cache_hit = entry is not None
        info = entry.info if entry is not None else self._probe(video)
        self._check_limits(video, info)
        t_probe = time.perf_counter() - t0
        want = info.n_frames if frames_needed is None else max(1, min(int(frames_needed), info.n_frames))
        timings = {"probe": t_probe, "decode": 0.0, "detect": 0.0}
        detected = 0
        if entry is None or entry.covered < want:
            frames_for = self._frames_by_decoding(video, options, timings, info)
            entry, detected = self._extend(entry, info, options, want, frames_for, timings)
            self.face_cache.put(entry_key, entry)
        return FacePlan(
            video_key=video_key, info=info, boxes=self._boxes(entry, options, want),
            detector=entry.detector, detected_frames=detected,
            cached=cache_hit and detected == 0, timings=timings,
        )

    def sync(self, video: bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
             plan: FacePlan | None = None) -> SyncResult:
        """Redraw the mouth of `video` to `audio`; an mp4 (H.264 + AAC) as long as the audio (+-1 frame)."""
        timings = {k: 0.0 for k in ("decode", "detect", "mel", "model", "paste", "encode")}
        self._check_options(options)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0 or sample_rate <= 0:
            raise InvalidAudio("the speech to lip-sync is empty")

        # faces: from the plan, the cache, or detection on the frames decoded below
        video_key, entry_key = self._keys(video, options)
        if plan is not None and plan.video_key != video_key:
            log.warning("ignoring a face plan made for another video")
            plan = None
        entry = self.face_cache.get(entry_key)
        info = plan.info if plan is not None else (entry.info if entry is not None else self._probe(video))
        self._check_limits(video, info)
        n_out = media.frames_needed(info.fps, audio.size / sample_rate)
        n_src = max(1, min(n_out, info.n_frames))

        t = time.perf_counter()
        stats: dict = {}
        frames = media.decode_frames(video, count=n_src, stats=stats)
        if len(frames) == 0:
            raise InvalidMedia("the video stream holds no decodable frame")
        n_src = len(frames)
        frames = self._downscale(frames, options.resize_factor)
        timings["decode"] = time.perf_counter() - t

        detected = 0
        if plan is not None and len(plan.boxes) >= n_src:
            source_boxes = plan.boxes[:n_src].astype(np.float64)
            detector, cache_hit = plan.detector, plan.cached
        else:
            cache_hit = entry is not None
            if entry is None or entry.covered < n_src:
                frames_for = self._frames_from(frames, options.resize_factor)
                entry, detected = self._extend(entry, info, options, n_src, frames_for, timings)
                self.face_cache.put(entry_key, entry)
            source_boxes = self._boxes(entry, options, n_src).astype(np.float64)
            detector = entry.detector
            cache_hit = cache_hit and detected == 0

        # mel windows, one per output frame
        t = time.perf_counter()
        mel = melspectrogram(_to_16k(audio, sample_rate))
        if mel.shape[1] < MEL_STEP:  # under 0.2 s of speech: pad with silence (the scale's floor)
            mel = np.pad(mel, ((0, 0), (0, MEL_STEP - mel.shape[1])), constant_values=-4.0)
        starts = output_mel_starts(mel.shape[1], n_out, info.fps)
        timings["mel"] = time.perf_counter() - t

        height, width = frames.shape[1:3]
        crop_boxes = padded_crop_boxes(source_boxes / options.resize_factor, options.pads, width, height)
        source_of = pingpong_indices(n_out, n_src)

        t = time.perf_counter()
        steps = {"model": 0.0, "paste": 0.0}
        out_frames = self._synced_frames(frames, crop_boxes, source_of, mel, starts, steps)
        mp4 = media.encode_mp4(out_frames, info.fps, audio, int(sample_rate))
        # the frames were produced lazily inside the encoder's loop: separate the two
        timings["model"], timings["paste"] = steps["model"], steps["paste"]
        timings["encode"] = time.perf_counter() - t - steps["model"] - steps["paste"]
        log.info("lip sync: %d output frames from %d decoded source frames (%s, %d detections)",
                 n_out, stats.get("decoded", n_src), detector, detected)
        return SyncResult(
            mp4=mp4, duration_s=n_out / info.fps, n_frames=n_out,
            decoded_frames=int(stats.get("decoded", n_src)), detected_frames=detected,
            timings=timings, synthetic_weights=self.synthetic_weights, face_cache_hit=cache_hit,
        )

    # ------------------------------------------------------------------ the loop

    def _synced_frames(self, frames: np.ndarray, crop_boxes: np.ndarray, source_of: np.ndarray,
                       mel: np.ndarray, starts: np.ndarray, steps: dict):
        """Yields output frames (RGB uint8) in order, one model batch at a time."""
        batch_size = self.batch_size()
        on_gpu = self.tensor_ops
        mel_t = torch.from_numpy(np.ascontiguousarray(mel))
        for lo in range(0, len(source_of), batch_size):
            t = time.perf_counter()
            idx = source_of[lo:lo + batch_size]
            regions = [frames[s, y1:y2, x1:x2] for s, (x1, y1, x2, y2) in ((s, crop_boxes[s]) for s in idx)]
            if on_gpu:
                regions_t = [torch.from_numpy(np.ascontiguousarray(r)).to(self.device, non_blocking=True) for r in regions]
                face_input = blend.crops_to_model_input(regions_t)
            else:
                face_input = blend.crops_to_model_input_np(regions)
            windows = torch.stack([mel_t[:, st:st + MEL_STEP] for st in starts[lo:lo + batch_size]])
            windows = windows.unsqueeze(1).to(self.device)  # B,1,80,16
            t_model = time.perf_counter()
            steps["paste"] += t_model - t

            with self._model_lock, torch.inference_mode():
                if self.autocast is not None:
                    with torch.autocast(self.device.type, dtype=self.autocast):
                        predictions = self.model(windows, face_input.to(self.device))  # autocast: eager only
                else:
                    predictions = self.lip_model(windows, face_input.to(self.device))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            t_paste = time.perf_counter()
            steps["model"] += t_paste - t_model

            if on_gpu:
                with torch.inference_mode():
                    mouths = [m.cpu().numpy() for m in blend.blend_mouths(predictions, regions_t)]
            else:
                mouths = blend.blend_mouths_np(predictions, regions)
            out = []
            for s, mouth in zip(idx, mouths):
                x1, y1, x2, y2 = crop_boxes[s]
                frame = frames[s].copy()
                frame[y1:y2, x1:x2] = mouth
                out.append(frame)
            steps["paste"] += time.perf_counter() - t_paste
            yield from out

    # ------------------------------------------------------------------ faces

    def _check_options(self, options: LipSyncOptions) -> None:
        if options.face_mode not in FACE_MODES:
            raise InvalidField(f"face_mode must be one of {', '.join(FACE_MODES)}, not {options.face_mode!r}",
                               field="options.face_mode")
        if not (isinstance(options.resize_factor, int) and 1 <= options.resize_factor <= 8):
            raise InvalidField("resize_factor must be an integer from 1 to 8", field="options.resize_factor")
        if len(options.pads) != 4 or any(int(p) < 0 for p in options.pads):
            raise InvalidField("pads must be four non-negative integers (top, bottom, left, right)", field="options.pads")
        if options.face_mode == "track" and options.track_every < 1:
            raise InvalidField("track_every must be at least 1", field="options.track_every")

    def _keys(self, video: bytes, options: LipSyncOptions) -> tuple[str, str]:
        video_key = content_key(video)
        parts = [options.face_mode, str(options.resize_factor), self.detector.name]
        if options.face_mode == "box":
            parts.append(repr(tuple(int(v) for v in options.box)) if options.box is not None else "none")
        if options.face_mode == "track":
            parts.append(str(options.track_every))
        return video_key, content_key(video_key.encode(), *parts)

    def _probe(self, video: bytes) -> VideoInfo:
        self._check_limits(video, None)
        info = media.probe(video)
        self._check_limits(video, info)
        return info

    def _check_limits(self, video: bytes, info: VideoInfo | None) -> None:
        """The configured input limits (413); checked on every call, cached probe or not."""
        s = self.settings
        if len(video) > s.max_input_bytes:
            raise InputTooLarge(f"the video is {len(video)} bytes; the limit is {s.max_input_bytes}")
        if info is None:
            return
        if info.duration > s.max_video_seconds:
            raise VideoTooLong(f"the video lasts {info.duration:.1f} s; the limit is {s.max_video_seconds:g} s")
        if info.width * info.height > s.max_resolution:
            raise ResolutionTooLarge(
                f"the video is {info.width}x{info.height} ({info.width * info.height} pixels); "
                f"the limit is {s.max_resolution} pixels")

    @staticmethod
    def _downscale(frames: np.ndarray, factor: int) -> np.ndarray:
        if factor == 1:
            return frames
        import cv2
        height, width = frames.shape[1:3]
        size = (max(2, width // factor), max(2, height // factor))
        return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])

    @staticmethod
    def _frames_from(frames: np.ndarray, resize_factor: int):
        """Frame source over already-decoded (possibly downscaled) frames; boxes scale back by the factor."""
        def get(indices: list[int]) -> tuple[np.ndarray, float]:
            return frames[indices], float(resize_factor)
        return get

    def _frames_by_decoding(self, video: bytes, options: LipSyncOptions, timings: dict, info: VideoInfo):
        """Frame source that decodes just up to the last frame asked for (plan_faces has no frames).

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

    def _extend(self, entry: _FaceEntry | None, info: VideoInfo, options: LipSyncOptions, want: int,
                frames_for, timings: dict) -> tuple[_FaceEntry, int]:
        """Settle face boxes for frames [0, want), detecting only what the entry lacks."""
        mode = options.face_mode
        if mode == "box":
            box = validate_box(options.box, info.width, info.height)
            return _FaceEntry(info, "given", {0: box}, info.n_frames), 0

        keyframes = dict(entry.keyframes) if entry is not None else {}
        if mode == "static":
            if any(b is not None for b in keyframes.values()):
                return replace(entry, covered=info.n_frames), 0
            step = max(1, round(info.fps / 2))
            candidates = [i for i in range(0, want, step)][:STATIC_TRIES]
            max_side, per_call = STATIC_MAX_SIDE, 1  # stop at the first frame with a face
        else:
            candidates = [i for i in track_keyframes(want, options.track_every) if i not in keyframes]
            max_side, per_call = TRACK_MAX_SIDE, max(1, len(candidates))

        detected = 0
        t = time.perf_counter()
        for lo in range(0, len(candidates), per_call):
            chunk = candidates[lo:lo + per_call]
            frames, scale = frames_for(chunk)
            t_det = time.perf_counter()
            boxes = detect_boxes(self.detector, frames, max_side)
            timings["detect"] = timings.get("detect", 0.0) + time.perf_counter() - t_det
            detected += len(chunk)
            for i, b in zip(chunk, boxes):
                keyframes[i] = None if b is None else b * scale
            if mode == "static" and any(b is not None for b in boxes):
                break
        log.debug("face %s: %d detections in %.2f s", mode, detected, time.perf_counter() - t)

        if not any(b is not None for b in keyframes.values()):
            tried = sorted(keyframes)
            shown = ", ".join(str(i) for i in tried[:8]) + (", ..." if len(tried) > 8 else "")
            raise NoFaceFound(
                f"no face found in the source video ({self.detector.name} detector, checked "
                f"{len(tried)} frame(s): {shown}). Use a video with a clearly visible frontal face, "
                "or give the face's position with face_mode='box'.")
        covered = info.n_frames if mode == "static" else want
        return _FaceEntry(info, self.detector.name, keyframes, covered), detected

    @staticmethod
    def _boxes(entry: _FaceEntry, options: LipSyncOptions, n: int) -> np.ndarray:
        """[n, 4] int boxes (source pixels) for frames [0, n)."""
        if options.face_mode == "track":
            boxes = interpolate_track(entry.keyframes, n)
        else:
            box = next(b for _, b in sorted(entry.keyframes.items()) if b is not None)
            boxes = np.repeat(np.asarray(box, dtype=np.float64)[None], n, axis=0)
        return np.round(boxes).astype(np.int64)
