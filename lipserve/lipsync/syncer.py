"""LipSyncer: the source video + the final speech -> the video with the mouth redrawn in sync.

What it does differently from the official inference script, and why:
  * decodes only the source frames the speech needs (min(output frames, source frames)),
    not the whole video;
  * finds the face on a few frames spread over the answer and keeps one box when the head is
    still (`auto`, the default), tracks it on every k-th frame when it moves (`track`), finds it
    once (`static`) or takes it from the caller (`box`), instead of running the detector on every
    output frame;
  * never dies on a frame without a face: short gaps are bridged, longer stretches (a cut-away)
    pass through untouched; only an answer with no face at all is refused;
  * remembers the probe and the face boxes per video (keyed by a hash of its bytes), so the
    same video with a new sentence skips detection;
  * when the speech outlasts the video, plays the video back and forth (0..n-1, n-2..1, 0, ...)
    instead of jumping back to frame 0;
  * gives one output frame per 1/fps of speech, so the output lasts as long as the audio
    (the official loop stops ~0.2 s early); the frames past the official count see silence
    after the speech (the mel is padded), so the mouth closes;
  * crops, resizes and blends on the model's device, and encodes in memory with the speech.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.signal
import torch

from .. import media
from ..audio.wav2lip_mel import MEL_FRAMES_PER_SECOND, MEL_STEP, SAMPLE_RATE, melspectrogram
from ..batching import SharedForward, merge_enabled
from ..cache import LRUCache, content_key
from ..device import autocast_dtype, pick_device
from ..errors import (InputTooLarge, InvalidAudio, InvalidField, InvalidMedia, NoFaceFound, ResolutionTooLarge,
                      VideoTooLong)
from ..gpu import BatchBudget, cap_memory, memory_fraction
from ..media import VideoInfo
from ..settings import Settings
from ..weights.resolve import load_concurrently
from . import blend
from .faces import (FaceDetector, HaarDetector, S3FDDetector, detect_boxes, face_presence, frame_ranges,
                    look_again_whole, padded_crop_boxes, refine_frames, second_look, spread_frames, still_box, track_boxes,
                    track_keyframes, validate_box)
from .networks import load_s3fd, load_wav2lip, wav2lip_filename

log = logging.getLogger("lipserve.lipsync")

FACE_MODES = ("auto", "static", "track", "box")
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
SILENT_MEL = -4.0  # the floor of Wav2Lip's normalised mel scale: what silence gives
# Reduced precision (autocast) is kept only while Wav2Lip's output on real-shaped inputs -- 8 face crops
# of the test clip (PRECISION_FACES, 96x96) and mel windows of speech-like audio -- stays within
# AUTOCAST_MAX_LEVELS of strict fp32 everywhere, in 8-bit levels of the output picture. Half a level:
# rounding to 8 bits then moves a pixel by at most one step, and only a pixel already half-way between
# two. Measured with CPU autocast on the synthetic weights: fp16 0.15 level max (0.025 mean), bf16 1.04
# max (0.19 mean), so fp16 passes and bf16 does not. Not measured on a GPU or on the real checkpoint:
# that is what the check at load is for.
AUTOCAST_MAX_LEVELS = 0.5
PRECISION_FACES = Path(__file__).parent / "assets" / "precision_faces.png"
HAAR_WARNING = ("faces were found with OpenCV's Haar cascade because s3fd.pth is not in {folder}: its boxes are "
                "rougher than those of the official S3FD detector Wav2Lip was trained with (`lipserve weights fetch`)")
CPU_BATCH_SIZE = 16    # Wav2Lip on CPU: 55 ms/frame at 16, slower at 64 (FACTS.md)
CUDA_BYTES_PER_ITEM = 64 * 1024 * 1024  # generous fp16 activation budget per 96x96 sample
CUDA_MAX_BATCH = 128   # frames per batch of one request
CUDA_MAX_MERGED = 512  # frames per forward when concurrent requests' batches merge
CPU_MAX_MERGED = 4 * CPU_BATCH_SIZE
DECODE_WINDOW_BYTES = 512 * 1024 * 1024  # plan_faces decodes at most this much at once


@dataclass
class LipSyncOptions:
    """One request's lip-sync options; None = this stage's setting of the same name (LipSyncer.resolve)."""

    face_mode: str | None = None        # auto | static | track | box
    box: tuple[int, int, int, int] | None = None   # x1, y1, x2, y2 in source pixels
    pads: tuple[int, int, int, int] | None = None  # top, bottom, left, right
    resize_factor: int | None = None
    track_every: int = 5


@dataclass
class FacePlan:
    """The video branch's product: small and picklable (no frames)."""

    video_key: str                  # content_key(video bytes)
    info: VideoInfo
    boxes: np.ndarray               # [covered, 4] int (x1, y1, x2, y2) per source frame [0, covered), source pixels
    present: np.ndarray             # [covered] bool: the frame has a face (False: passed through untouched)
    detector: str                   # "s3fd" | "haar" | "given"
    mode: str                       # how the boxes were settled: static | track | box | auto/still | auto/track
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
    frames_passed_through: int = 0  # output frames left exactly as decoded (no face there)
    face_mode: str = ""             # FacePlan.mode
    warnings: list[str] = field(default_factory=list)
    precision: str = "fp32"         # Wav2Lip's arithmetic: fp32, fp16 or bf16 (autocast)


@dataclass
class Rendering:
    """The output frames of one answer, before encoding (`frames` is a one-shot iterator)."""

    frames: Iterator[np.ndarray]    # RGB uint8, in output order; produced lazily, one model batch at a time
    source: np.ndarray              # the decoded (and downscaled) source frames the answer uses
    source_of: np.ndarray           # [n_out] source frame index of each output frame
    passed_through: np.ndarray      # [n_out] bool: this output frame is source[source_of[i]] untouched
    info: VideoInfo
    plan: FacePlan
    detected_frames: int
    cache_hit: bool
    decoded_frames: int


@dataclass(frozen=True)
class _FaceEntry:
    """What the face cache remembers about one (video, mode, options) combination."""

    info: VideoInfo
    detector: str
    keyframes: dict  # source frame -> box (source pixels) or None where no face was found
    covered: int     # source frames whose boxes are settled
    moving: bool = False  # auto: the probes saw the head move or miss, so it is tracked


def pingpong_indices(n_out: int, n_src: int) -> np.ndarray:
    """Source frame for each output frame: 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... (no jump back to 0)."""
    if n_src <= 1:
        return np.zeros(n_out, dtype=np.int64)
    period = 2 * (n_src - 1)
    phase = np.arange(n_out, dtype=np.int64) % period
    return np.where(phase < n_src, phase, period - phase)


def output_mel_starts(n_out: int, fps: float) -> np.ndarray:
    """First mel frame of each output frame's 16-frame window: int(i * 80 / fps), as the official
    loop, one window per output frame (the official loop stops at the last whole window)."""
    return np.array([int(i * (MEL_FRAMES_PER_SECOND / fps)) for i in range(n_out)], dtype=np.int64)


def mel_for_output(mel: np.ndarray, n_out: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(mel padded on the right with silence, window starts): every output frame gets its own
    window, so the frames past the end of the speech see the silence after it and close the mouth
    (the official script reuses its final window there, which holds the mouth open)."""
    starts = output_mel_starts(n_out, fps)
    needed = int(starts[-1]) + MEL_STEP if n_out else MEL_STEP
    if mel.shape[1] < needed:
        mel = np.pad(mel, ((0, 0), (0, needed - mel.shape[1])), constant_values=SILENT_MEL)
    return mel, starts


def precision_probe(n_faces: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Wav2Lip inputs for the precision check: ([n, 6, 96, 96] faces, [n, 1, 80, 16] mel windows)."""
    import cv2

    from ..testmedia import speechlike

    strip = cv2.cvtColor(cv2.imread(str(PRECISION_FACES), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    side = strip.shape[0]
    crops = [strip[:, k * side:(k + 1) * side] for k in range(min(n_faces, strip.shape[1] // side))]
    mel = melspectrogram(speechlike(2.0, SAMPLE_RATE, seed=7))
    starts = np.linspace(0, mel.shape[1] - MEL_STEP, len(crops)).astype(int)
    windows = torch.stack([torch.from_numpy(np.ascontiguousarray(mel[:, s:s + MEL_STEP])) for s in starts])
    return blend.crops_to_model_input_np(crops), windows.unsqueeze(1)


def strict_fp32(device: torch.device):
    """A context where CUDA convolutions run in true fp32 (PyTorch lets cuDNN use TF32 by default)."""
    if device.type != "cuda":
        return nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return audio
    g = math.gcd(int(sample_rate), SAMPLE_RATE)
    return scipy.signal.resample_poly(audio, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)


class LipSyncer:
    """Loads Wav2Lip (and S3FD when its file is there) once; `plan_faces` and `sync` per request."""

    def __init__(self, settings: Settings, gpu_share: float | None = None):
        """`gpu_share`: the replica's GPU fraction (Ray's num_gpus); caps CUDA memory (lipserve.gpu)."""
        self.settings = settings
        self.device = pick_device(settings.device)
        self.memory_cap = cap_memory(self.device, memory_fraction(settings, gpu_share))
        self.budget = BatchBudget(self.device, bytes_per_item=CUDA_BYTES_PER_ITEM, max_items=CUDA_MAX_MERGED,
                                  cpu_items=CPU_MAX_MERGED, cap_bytes=self.memory_cap)
        # every Wav2Lip forward goes through this: concurrent requests' frames share forwards
        self.wav2lip = SharedForward(self._forward, merge=merge_enabled(settings, self.device),
                                     max_items=self.budget.items, wait_s=settings.batching_wait_ms / 1000,
                                     device=self.device, name="wav2lip")
        # the two networks do not depend on each other: load them side by side
        loaded, self.load_timings = load_concurrently({
            "wav2lip": lambda: load_wav2lip(settings, self.device),
            "s3fd": lambda: load_s3fd(settings, self.device),
        })
        self.model, self.synthetic_weights = loaded["wav2lip"]
        if self.synthetic_weights:
            log.warning("LIP SYNC ON SYNTHETIC WEIGHTS: %s is missing; every result is flagged "
                        "synthetic_weights=true and its mouths are NOT meaningful", wav2lip_filename(settings))
        self.autocast = autocast_dtype(self.device, settings.precision)
        self.precision_gap: float | None = None  # max |autocast - fp32| of the output, 8-bit levels
        # crop/blend with torch ops on an accelerator, with cv2 on CPU (see blend.py)
        self.tensor_ops = self.device.type != "cpu"
        # the fast graphs (lipserve.fast) where the settings and their bounds allow, else the eager modules
        from ..fast import fast_s3fd, fast_wav2lip

        threads, cache = settings.cpu_threads(), settings.fast_cache_dir
        self.lip_model, report = fast_wav2lip(self.model, settings.wav2lip_backend, self.device, threads, cache)
        self.fast_paths = {"wav2lip": report.as_dict()}
        s3fd = loaded["s3fd"]
        if s3fd is not None:
            s3fd, report = fast_s3fd(s3fd, settings.s3fd_backend, self.device, threads, cache)
            self.fast_paths["s3fd"] = report.as_dict()
        self.detector: FaceDetector = S3FDDetector(s3fd, self.device) if s3fd is not None else HaarDetector()
        if s3fd is None:
            log.info("s3fd.pth not in %s: faces are found with OpenCV's Haar cascade", settings.weights_dir)
        self.face_cache: LRUCache[_FaceEntry] = LRUCache(settings.face_cache_size)
        self.warm_up_report: dict[str, float] | None = None  # set by warm_up()
        if self.autocast is not None:
            self._check_autocast(keep_anyway=settings.precision != "auto")
        log.info("lip sync: Wav2Lip on %s in %s", self.device, self.precision_name)

    # ------------------------------------------------------------------ precision

    def autocast_gap(self, n_faces: int = 8) -> float:
        """Max |autocast - fp32| of Wav2Lip's output (8-bit levels) on face crops of the test clip."""
        faces, windows = precision_probe(n_faces)
        faces, windows = faces.to(self.device), windows.to(self.device)
        reduced = self._forward(windows, faces)
        saved, self.autocast = self.autocast, None
        try:
            with strict_fp32(self.device):
                full = self._forward(windows, faces)
        finally:
            self.autocast = saved
        return float((reduced.float() - full.float()).abs().max()) * 255.0

    def _check_autocast(self, keep_anyway: bool, gap: float | None = None) -> None:
        """Keep the autocast dtype if `gap` (measured now when not given) is within AUTOCAST_MAX_LEVELS."""
        self.precision_gap = self.autocast_gap() if gap is None else gap
        name = self.precision_name
        if self.precision_gap <= AUTOCAST_MAX_LEVELS:
            log.info("lip sync: %s autocast within %.3f levels of fp32 (tolerance %.2f)", name, self.precision_gap,
                     AUTOCAST_MAX_LEVELS)
        elif keep_anyway:
            log.warning("lip sync: %s autocast differs from fp32 by %.3f levels (tolerance %.2f); kept because "
                        "precision was set explicitly", name, self.precision_gap, AUTOCAST_MAX_LEVELS)
        else:
            log.warning("lip sync: %s autocast differs from fp32 by %.3f levels (tolerance %.2f); using fp32",
                        name, self.precision_gap, AUTOCAST_MAX_LEVELS)
            self.autocast = None

    # ------------------------------------------------------------------ public

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "checkpoint": wav2lip_filename(self.settings),
            "synthetic_weights": self.synthetic_weights,
            "face_detector": self.detector.name,
            "precision": self.precision_name,
            "autocast_max_levels": self.precision_gap,
            "batch_size": self.batch_size(),
            "batching": self.wav2lip.describe(),
            "memory_cap_bytes": self.memory_cap,
            "face_cache": self.face_cache.stats(),
            "fast_paths": self.fast_paths,
            "load_timings": {name: round(seconds, 3) for name, seconds in self.load_timings.items()},
            "warm_up": self.warm_up_report,
        }

    @property
    def precision_name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.autocast, "fp32")

    def warm_up(self, seconds: float | None = None, inputs=None) -> dict[str, float]:
        """Every path of a request once, on synthetic inputs (lipserve.warmup), caches untouched.

        Face finding in the configured default mode and in track mode (probe, decode, the
        detector's first runs at both working sizes); the warm-up clip holds no face, so each ends
        in NoFaceFound, the right answer for it. Then `sync` with a given box on speech long enough
        for one full Wav2Lip batch and a partial one (every request runs both shapes), which also
        decodes, computes the mel windows, pastes and encodes. Returns seconds per path."""
        from ..warmup import WarmupReport, warmup_inputs

        inputs = inputs or warmup_inputs(seconds or self.settings.warmup_seconds)
        report = WarmupReport()
        pads, resize = tuple(self.settings.pads), int(self.settings.resize_factor)
        frames = round(inputs.seconds * inputs.fps)
        for mode in dict.fromkeys([self.settings.face_mode, "track"]):
            if mode == "box":
                continue  # nothing to find
            options = LipSyncOptions(face_mode=mode, pads=pads, resize_factor=resize)
            with report.path(f"faces.{mode}"):
                try:
                    self.plan_faces(inputs.video, options, min(frames, options.track_every + 1), use_cache=False)
                except NoFaceFound:
                    pass  # the expected answer for a clip without a face: the detector has run
        batch = self.batch_size()
        n_out = max(frames, batch + 1)
        audio = np.resize(np.asarray(inputs.speech), int(n_out / inputs.fps * inputs.sample_rate))
        options = LipSyncOptions(face_mode="box", box=inputs.box, pads=pads, resize_factor=resize)
        with report.path(f"sync.{n_out}_frames_batch_{batch}"):
            result = self.sync(inputs.video, audio, inputs.sample_rate, options, use_cache=False)
        report.update({f"sync.{step}": round(seconds, 4) for step, seconds in result.timings.items()})
        self.warm_up_report = dict(report)
        return self.warm_up_report

    def clear_face_cache(self) -> None:
        self.face_cache = LRUCache(self.settings.face_cache_size)

    def batch_size(self) -> int:
        """Frames per Wav2Lip batch of one request: from the memory cap on CUDA, a fixed sane size on CPU."""
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        return min(CUDA_MAX_BATCH, self.budget.items())

    def plan_faces(self, video: bytes, options: LipSyncOptions, frames_needed: int | None = None, *,
                   use_cache: bool = True) -> FacePlan:
        """Probe (+ limits) and face boxes for source frames [0, frames_needed) (all if None).

        `use_cache=False` neither reads nor fills the face cache (the warm-up)."""
        t0 = time.perf_counter()
        options = self.resolve(options)
        self._check_options(options)
        video_key, entry_key = self._keys(video, options)
        entry = self.face_cache.get(entry_key) if use_cache else None
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
            if use_cache:
                self.face_cache.put(entry_key, entry)
        boxes, present, mode = self._layout(entry, options, want)
        return FacePlan(
            video_key=video_key, info=info, boxes=boxes, present=present, detector=entry.detector, mode=mode,
            detected_frames=detected, cached=cache_hit and detected == 0, timings=timings,
        )

    def render(self, video: bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
               plan: FacePlan | None = None, timings: dict | None = None, *,
               use_cache: bool = True) -> tuple[Rendering, np.ndarray]:
        """The answer's frames, not yet encoded, and the speech's mel as the model sees it.

        Output frame i shows source frame source_of[i] (ping-pong) with the mouth redrawn to the
        speech, or exactly as decoded where that source frame has no face. `use_cache=False` neither
        reads nor fills the face cache (the warm-up).
        """
        timings = timings if timings is not None else {}
        options = self.resolve(options)
        self._check_options(options)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0 or sample_rate <= 0:
            raise InvalidAudio("the speech to lip-sync is empty")

        # faces: from the plan, the cache, or detection on the frames decoded below
        video_key, entry_key = self._keys(video, options)
        if plan is not None and plan.video_key != video_key:
            log.warning("ignoring a face plan made for another video")
            plan = None
        entry = self.face_cache.get(entry_key) if use_cache else None
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
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t

        detected = 0
        if plan is not None and len(plan.boxes) >= n_src:
            cache_hit = plan.cached
        else:
            cache_hit = entry is not None
            if entry is None or entry.covered < n_src:
                frames_for = self._frames_from(frames, options.resize_factor)
                entry, detected = self._extend(entry, info, options, n_src, frames_for, timings)
                if use_cache:
                    self.face_cache.put(entry_key, entry)
            boxes, present, mode = self._layout(entry, options, n_src)
            plan = FacePlan(video_key=video_key, info=info, boxes=boxes, present=present, detector=entry.detector,
                            mode=mode, detected_frames=detected, cached=cache_hit and detected == 0)
            cache_hit = plan.cached

        # mel windows, one per output frame
        t = time.perf_counter()
        mel, starts = mel_for_output(melspectrogram(_to_16k(audio, sample_rate)), n_out, info.fps)
        timings["mel"] = timings.get("mel", 0.0) + time.perf_counter() - t

        height, width = frames.shape[1:3]
        face_boxes = np.round(plan.boxes[:n_src].astype(np.float64) / options.resize_factor).astype(np.int64)
        crop_boxes = padded_crop_boxes(face_boxes, options.pads, width, height)
        source_of = pingpong_indices(n_out, n_src)
        present = np.asarray(plan.present[:n_src], dtype=bool)
        rendering = Rendering(
            frames=self._synced_frames(frames, crop_boxes, face_boxes, present, source_of, mel, starts, timings),
            source=frames, source_of=source_of, passed_through=~present[source_of], info=info, plan=plan,
            detected_frames=detected, cache_hit=cache_hit, decoded_frames=int(stats.get("decoded", n_src)),
        )
        return rendering, mel

    def sync(self, video: bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
             plan: FacePlan | None = None, *, use_cache: bool = True) -> SyncResult:
        """Redraw the mouth of `video` to `audio`; an mp4 (H.264 + AAC) as long as the audio (+-1 frame).

        `use_cache=False` neither reads nor fills the face cache (the warm-up)."""
        t_start = time.perf_counter()
        timings = {k: 0.0 for k in ("decode", "detect", "mel", "model", "paste", "encode")}
        rendering, _ = self.render(video, audio, sample_rate, options, plan, timings, use_cache=use_cache)
        info = rendering.info
        t = time.perf_counter()
        before = timings["model"] + timings["paste"]
        mp4 = media.encode_mp4(self._pulled(rendering.frames, t_start, timings), info.fps,
                               np.asarray(audio, dtype=np.float32).reshape(-1), int(sample_rate),
                               colour=info.colour.for_output())
        # the frames were produced lazily inside the encoder's loop: separate the two
        timings["encode"] = time.perf_counter() - t - (timings["model"] + timings["paste"] - before)
        n_out = len(rendering.source_of)
        passed = int(rendering.passed_through.sum())
        log.info("lip sync: %d output frames from %d decoded source frames (%s, %s, %d detections, %d passed through)",
                 n_out, rendering.decoded_frames, rendering.plan.detector, rendering.plan.mode,
                 rendering.detected_frames, passed)
        return SyncResult(
            mp4=mp4, duration_s=n_out / info.fps, n_frames=n_out, decoded_frames=rendering.decoded_frames,
            detected_frames=rendering.detected_frames, timings=timings, synthetic_weights=self.synthetic_weights,
            face_cache_hit=rendering.cache_hit, frames_passed_through=passed, face_mode=rendering.plan.mode,
            warnings=self._warnings(rendering), precision=self.precision_name,
        )

    def _warnings(self, rendering: Rendering) -> list[str]:
        notes = []
        if self.autocast is not None and self.precision_gap is not None and self.precision_gap > AUTOCAST_MAX_LEVELS:
            notes.append(f"lip sync runs {self.precision_name} as configured although its output differs from fp32 "
                         f"by up to {self.precision_gap:.2f} 8-bit levels (tolerance {AUTOCAST_MAX_LEVELS})")
        if rendering.plan.detector == HaarDetector.name:
            notes.append(HAAR_WARNING.format(folder=self.settings.weights_dir))
        passed = rendering.passed_through
        if passed.any():
            spans = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in frame_ranges(passed)[:6])
            more = ", ..." if len(frame_ranges(passed)) > 6 else ""
            notes.append(f"no face in {int(passed.sum())} of {len(passed)} output frames (frames {spans}{more}): "
                         "they are passed through as in the source, without lip sync")
        return notes

    # ------------------------------------------------------------------ the loop

    def _synced_frames(self, frames: np.ndarray, crop_boxes: np.ndarray, face_boxes: np.ndarray, present: np.ndarray,
                       source_of: np.ndarray, mel: np.ndarray, starts: np.ndarray, steps: dict) -> Iterator[np.ndarray]:
        """Yields output frames (RGB uint8) in order: the model runs one batch of face frames at a
        time; frames without a face are yielded exactly as decoded (the same array, not a copy)."""
        steps.setdefault("model", 0.0)
        steps.setdefault("paste", 0.0)
        batch_size = self.batch_size()
        on_gpu = self.tensor_ops
        mel_t = torch.from_numpy(np.ascontiguousarray(mel))
        with_face = [i for i in range(len(source_of)) if present[source_of[i]]]
        next_out = 0
        for lo in range(0, len(with_face), batch_size):
            t = time.perf_counter()
            outputs = with_face[lo:lo + batch_size]
            idx = [int(source_of[i]) for i in outputs]
            regions = [frames[s, y1:y2, x1:x2] for s, (x1, y1, x2, y2) in ((s, crop_boxes[s]) for s in idx)]
            # the detected face inside each crop: the blend feathers in the margin outside it
            inner = [tuple(int(v) for v in face_boxes[s] - np.tile(crop_boxes[s][:2], 2)) for s in idx]
            if on_gpu:
                regions_t = [torch.from_numpy(np.ascontiguousarray(r)).to(self.device, non_blocking=True) for r in regions]
                face_input = blend.crops_to_model_input(regions_t)
            else:
                face_input = blend.crops_to_model_input_np(regions)
            windows = torch.stack([mel_t[:, st:st + MEL_STEP] for st in starts[outputs]])
            windows = windows.unsqueeze(1).to(self.device)  # B,1,80,16
            t_model = time.perf_counter()
            steps["paste"] += t_model - t

            predictions = self.wav2lip(windows, face_input.to(self.device))
            t_paste = time.perf_counter()
            steps["model"] += t_paste - t_model

            if on_gpu:
                with torch.inference_mode():
                    mouths = [m.cpu().numpy() for m in blend.blend_mouths(predictions, regions_t, inner)]
            else:
                mouths = blend.blend_mouths_np(predictions, regions, inner)
            out = []
            for i, s, mouth in zip(outputs, idx, mouths):
                while next_out < i:  # frames without a face before this one
                    out.append(frames[source_of[next_out]])
                    next_out += 1
                x1, y1, x2, y2 = crop_boxes[s]
                frame = frames[s].copy()
                frame[y1:y2, x1:x2] = mouth
                out.append(frame)
                next_out += 1
            steps["paste"] += time.perf_counter() - t_paste
            yield from out
        while next_out < len(source_of):
            yield frames[source_of[next_out]]
            next_out += 1

    def _forward(self, windows: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """One Wav2Lip forward (B,1,80,16 mel windows + B,6,96,96 faces -> B,3,96,96) in the precision
        settled at load; requests reach it through self.wav2lip, which may merge their batches."""
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    predictions = self.model(windows, faces)  # autocast: eager modules only
            else:
                predictions = self.lip_model(windows, faces)  # the fast graph where chosen at load
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return predictions

    def _pulled(self, frames, t_start: float, timings: dict):
        """The frames as the encoder pulls them. Until the last one this request is in flight for
        cross-request batching; timings['first_frame'] = seconds from t_start to the first frame
        (what a streaming answer could send first)."""
        with self.wav2lip.request():
            for i, frame in enumerate(frames):
                if i == 0:
                    timings["first_frame"] = time.perf_counter() - t_start
                yield frame

    # ------------------------------------------------------------------ faces

    def resolve(self, options: LipSyncOptions) -> LipSyncOptions:
        """The request's options with what it left unset taken from this stage's settings: the
        stage owns these defaults, so its deployment's user_config is what its requests get."""
        s = self.settings
        return replace(
            options,
            face_mode=options.face_mode or ("box" if options.box is not None else s.face_mode),
            pads=tuple(options.pads) if options.pads is not None else tuple(s.pads),
            resize_factor=options.resize_factor if options.resize_factor is not None else int(s.resize_factor),
        )

    def _check_options(self, options: LipSyncOptions) -> None:
        if options.face_mode not in FACE_MODES:
            raise InvalidField(f"face_mode must be one of {', '.join(FACE_MODES)}, not {options.face_mode!r}",
                               field="options.face_mode")
        if not (isinstance(options.resize_factor, int) and 1 <= options.resize_factor <= 8):
            raise InvalidField("resize_factor must be an integer from 1 to 8", field="options.resize_factor")
        if len(options.pads) != 4 or any(int(p) < 0 for p in options.pads):
            raise InvalidField("pads must be four non-negative integers (top, bottom, left, right)", field="options.pads")
        if options.face_mode in ("track", "auto") and options.track_every < 1:
            raise InvalidField("track_every must be at least 1", field="options.track_every")

    def _keys(self, video: bytes, options: LipSyncOptions) -> tuple[str, str]:
        video_key = content_key(video)
        parts = [options.face_mode, str(options.resize_factor), self.detector.name]
        if options.face_mode == "box":
            parts.append(repr(tuple(int(v) for v in options.box)) if options.box is not None else "none")
        if options.face_mode in ("track", "auto"):
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
            return _FaceEntry(info, self.detector.name, keyframes, info.n_frames), detected

        moving = entry.moving if entry is not None else False
        if mode == "auto" and not moving:
            covered = entry.covered if entry is not None else 0
            detect(spread_frames(want, AUTO_PROBES, start=covered), track_side)
            probes = [keyframes[i] for i in sorted(keyframes)]
            if all(b is not None for b in probes) and still_box(probes, AUTO_MIN_IOU, AUTO_MAX_SHIFT) is not None:
                return _FaceEntry(info, self.detector.name, keyframes, want), detected
            log.debug("auto face mode: the head moves or leaves the picture; tracking it")

        # track (and auto, once the head moved or went missing): every k-th frame and the last,
        # then the frames around each appearance / disappearance, so those are exact
        max_gap = self._max_gap(info)
        detect(track_keyframes(want, options.track_every) + [want - 1], track_side)
        detect(refine_frames(keyframes, want, max_gap), track_side)
        detected += self._second_look(keyframes, want, max_gap, frames_for, timings)
        self._require_a_face(keyframes)
        return _FaceEntry(info, self.detector.name, keyframes, want, moving=True), detected

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
    def _max_gap(info: VideoInfo) -> int:
        return int(MAX_BRIDGE_SECONDS * info.fps + 1e-6)

    def _layout(self, entry: _FaceEntry, options: LipSyncOptions, n: int) -> tuple[np.ndarray, np.ndarray, str]:
        """([n, 4] int boxes in source pixels, [n] bool face present, mode used) for frames [0, n)."""
        mode = options.face_mode
        found = [b for _, b in sorted(entry.keyframes.items()) if b is not None]
        if mode in ("track", "auto") and (mode == "track" or entry.moving):
            # laid out over every settled frame, then cut: a shorter answer gets the same boxes
            present = face_presence(entry.keyframes, max(n, entry.covered), self._max_gap(entry.info))
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
