"""LipSyncer: the source video + the final speech -> the video with the mouth redrawn in sync.

What it does differently from the official inference script, and why:
  * decodes only the source frames the speech needs (min(output frames, source frames)),
    not the whole video;
  * takes the face boxes from its FacePlanner (planner.py: a few detections instead of one per
    output frame, remembered per video);
  * never dies on a frame without a face: short gaps are bridged, longer stretches (a cut-away)
    pass through untouched; only an answer with no face at all is refused;
  * when the speech outlasts the video, plays the video back and forth (0..n-1, n-2..1, 0, ...)
    instead of jumping back to frame 0;
  * gives one output frame per 1/fps of speech, so the output lasts as long as the audio
    (the official loop stops ~0.2 s early); the frames past the official count see silence
    after the speech (the mel is padded), so the mouth closes;
  * crops, resizes and blends on the model's device, and encodes in memory with the speech.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from .. import media
from ..audio.wav2lip_mel import melspectrogram
from ..batching import SharedForward, merge_enabled
from ..cache import LRUCache
from ..errors import InvalidAudio, InvalidMedia, NoFaceFound
from ..gpu import BatchBudget
from ..media import SourceVideo, as_source
from ..media.fragments import FIRST_FRAGMENT_FRAMES, stream_mp4
from ..runtime import ModelRuntime, OnRuntime
from ..settings import Settings
from ..weights.resolve import load_concurrently
from . import precision
from .detectors import FaceDetector, HaarDetector, S3FDDetector
from .faces import frame_ranges, padded_crop_boxes
from .frame_loop import synced_frames
from .networks import load_s3fd, load_wav2lip, wav2lip_filename
from .options import LipSyncOptions, check_options
from .planner import FaceEntry, FacePlan, FacePlanner, frames_from
from .results import Rendering, SyncResult
from .timeline import downscale, mel_for_output, pingpong_indices, to_16k

log = logging.getLogger("lipserve.lipsync")

HAAR_WARNING = ("faces were found with OpenCV's Haar cascade because s3fd.pth is not in {folder}: its boxes are "
                "rougher than those of the official S3FD detector Wav2Lip was trained with (`lipserve weights fetch`)")
CPU_BATCH_SIZE = 16    # Wav2Lip on CPU: 55 ms/frame at 16, slower at 64 (docs/FACTS.md)
CUDA_BYTES_PER_ITEM = 64 * 1024 * 1024  # generous fp16 activation budget per 96x96 sample
CUDA_MAX_BATCH = 128   # frames per batch of one request
CUDA_MAX_MERGED = 512  # frames per forward when concurrent requests' batches merge
CPU_MAX_MERGED = 4 * CPU_BATCH_SIZE


class LipSyncer(OnRuntime):
    """Loads Wav2Lip (and S3FD when its file is there) once; `plan_faces` and `sync` per request."""

    def __init__(self, settings: Settings, gpu_share: float | None = None, detector: FaceDetector | None = None):
        """`gpu_share`: the replica's GPU fraction (Ray's num_gpus); caps CUDA memory (lipserve.gpu).
        `detector`: finds the faces instead of S3FD or the Haar fallback (then s3fd.pth is not loaded)."""
        self.runtime = ModelRuntime(settings.runtime, gpu_share)
        self.budget = BatchBudget(self.device, bytes_per_item=CUDA_BYTES_PER_ITEM, max_items=CUDA_MAX_MERGED,
                                  cpu_items=CPU_MAX_MERGED, cap_bytes=self.runtime.memory_cap)
        # every Wav2Lip forward goes through this: concurrent requests' frames share forwards
        self.wav2lip = SharedForward(self._forward, merge=merge_enabled(settings, self.device),
                                     max_items=self.budget.items, wait_s=settings.lipsync.batching_wait_ms / 1000,
                                     device=self.device, name="wav2lip")
        # the two networks do not depend on each other: load them side by side
        loaders = {"wav2lip": lambda: load_wav2lip(settings, self.device)}
        if detector is None:
            loaders["s3fd"] = lambda: load_s3fd(settings, self.device)
        loaded, self.load_timings = load_concurrently(loaders)
        self.model, self.synthetic_weights = loaded["wav2lip"]
        if self.synthetic_weights:
            log.warning("LIP SYNC ON SYNTHETIC WEIGHTS: %s is missing; every result is flagged "
                        "synthetic_weights=true and its mouths are NOT meaningful", wav2lip_filename(settings))
        self.precision_gap: float | None = None  # max |autocast - fp32| of the output, 8-bit levels
        # crop/blend with torch ops on an accelerator, with cv2 on CPU (see blend.py)
        self.tensor_ops = self.device.type != "cpu"
        # the fast graphs (lipserve.fast) where the settings and their bounds allow, else the eager modules
        from ..fast import fast_s3fd, fast_wav2lip

        self.lip_model, report = self.runtime.fast(fast_wav2lip, self.model, settings.lipsync.wav2lip_backend)
        self.fast_paths = {"wav2lip": report.as_dict()}
        s3fd = loaded.get("s3fd")
        if s3fd is not None:
            s3fd, report = self.runtime.fast(fast_s3fd, s3fd, settings.lipsync.s3fd_backend)
            self.fast_paths["s3fd"] = report.as_dict()
        if detector is None:
            detector = S3FDDetector(s3fd, self.device) if s3fd is not None else HaarDetector()
            if s3fd is None:
                log.info("s3fd.pth not in %s: faces are found with OpenCV's Haar cascade", settings.runtime.weights_dir)
        self.planner = FacePlanner(settings, detector)
        self.warm_up_report: dict[str, float] | None = None  # set by warm_up()
        if self.autocast is not None:
            self._check_autocast()
        log.info("lip sync: Wav2Lip on %s in %s", self.device, self.precision_name)

    @property
    def settings(self) -> Settings:
        """This stage's settings; the planner reads the same object (face cache size, input limits)."""
        return self.planner.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.planner.settings = settings

    @property
    def detector(self) -> FaceDetector:
        return self.planner.detector

    @property
    def face_cache(self) -> LRUCache[FaceEntry]:
        return self.planner.cache

    def clear_face_cache(self) -> None:
        self.planner.clear_cache()

    # ------------------------------------------------------------------ precision

    def autocast_gap(self, n_faces: int = 8) -> float:
        """Max |autocast - fp32| of Wav2Lip's output (8-bit levels) on face crops of the test clip."""
        return precision.output_gap(lambda w, f: self._run(w, f, self.autocast), lambda w, f: self._run(w, f, None),
                                    self.device, n_faces)

    def _check_autocast(self, keep_anyway: bool | None = None, gap: float | None = None) -> None:
        """Keep the autocast dtype if `gap` (measured now when not given) is within AUTOCAST_MAX_LEVELS."""
        self.precision_gap = self.autocast_gap() if gap is None else gap
        figures = (f"{self.precision_name} autocast differs from fp32 by {self.precision_gap:.3f} levels "
                   f"(tolerance {precision.AUTOCAST_MAX_LEVELS:.2f})")
        self.runtime.settle_autocast("lip sync", figures, self.precision_gap <= precision.AUTOCAST_MAX_LEVELS,
                                     keep_anyway=keep_anyway)

    @property
    def precision_name(self) -> str:
        return self.runtime.precision_name

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
            "memory_cap_bytes": self.runtime.memory_cap,
            "face_cache": self.face_cache.stats(),
            "fast_paths": self.fast_paths,
            "load_timings": {name: round(seconds, 3) for name, seconds in self.load_timings.items()},
            "warm_up": self.warm_up_report,
        }

    def preload(self) -> None:
        """Nothing is lazy here: the networks load in the constructor."""

    def warm_up(self, seconds: float | None = None, inputs=None) -> dict[str, float]:
        """Every path of a request once, on synthetic inputs (lipserve.warmup), caches untouched.

        Face finding in the configured default mode and in track mode (probe, decode, the
        detector's first runs at both working sizes); the warm-up clip holds no face, so each ends
        in NoFaceFound, the right answer for it. Then `sync` with a given box on speech long enough
        for one full Wav2Lip batch and a partial one (every request runs both shapes), which also
        decodes, computes the mel windows, pastes and encodes; then a streamed answer just long
        enough for its first batch. Returns seconds per path."""
        from ..warmup import WarmupReport, warmup_inputs

        inputs = inputs or warmup_inputs(seconds or self.settings.runtime.warmup_seconds)
        report = WarmupReport()
        pads, resize = tuple(self.settings.lipsync.pads), int(self.settings.lipsync.resize_factor)
        frames = round(inputs.seconds * inputs.fps)
        for mode in dict.fromkeys([self.settings.lipsync.face_mode, "track"]):
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
        # a streamed answer's first batch is a shape of its own, and its fragments a muxer of their own
        n_stream = FIRST_FRAGMENT_FRAMES + 1
        with report.path(f"stream.{n_stream}_frames"):
            audio = audio[:int(n_stream / inputs.fps * inputs.sample_rate)]
            for _ in self._answer(inputs.video, audio, inputs.sample_rate, options, None, use_cache=False,
                                  streamed=True):
                pass
        self.warm_up_report = dict(report)
        return self.warm_up_report

    def batch_size(self) -> int:
        """Frames per Wav2Lip batch of one request: from the memory cap on CUDA, a fixed sane size on CPU."""
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        return min(CUDA_MAX_BATCH, self.budget.items())

    def resolve(self, options: LipSyncOptions) -> LipSyncOptions:
        """The request's options with what it left unset taken from this stage's settings: the
        stage owns these defaults, so its deployment's user_config is what its requests get."""
        s = self.settings.lipsync
        return replace(
            options,
            face_mode=options.face_mode or ("box" if options.box is not None else s.face_mode),
            pads=tuple(options.pads) if options.pads is not None else tuple(s.pads),
            resize_factor=options.resize_factor if options.resize_factor is not None else int(s.resize_factor),
        )

    def plan_faces(self, video: SourceVideo | bytes, options: LipSyncOptions, frames_needed: int | None = None, *,
                   use_cache: bool = True) -> FacePlan:
        """Face boxes for source frames [0, frames_needed) (all if None). `video`: as the ingress made
        it (its probe and hash), or bytes (probed and hashed here).

        `use_cache=False` neither reads nor fills the face cache (the warm-up)."""
        options = self.resolve(options)
        check_options(options)
        return self.planner.plan(as_source(video), options, frames_needed, use_cache=use_cache)

    def render(self, video: SourceVideo | bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
               plan: FacePlan | None = None, timings: dict | None = None, *,
               use_cache: bool = True, first_batch: int | None = None) -> tuple[Rendering, np.ndarray]:
        """The answer's frames, not yet encoded, and the speech's mel as the model sees it.

        Output frame i shows source frame source_of[i] (ping-pong) with the mouth redrawn to the
        speech, or exactly as decoded where that source frame has no face. `use_cache=False` neither
        reads nor fills the face cache (the warm-up); `first_batch` caps the first Wav2Lip batch.
        """
        timings = timings if timings is not None else {}
        options = self.resolve(options)
        check_options(options)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0 or sample_rate <= 0:
            raise InvalidAudio("the speech to lip-sync is empty")

        # faces: from the plan, the cache, or detection on the frames decoded below
        source = as_source(video)
        lookup = self.planner.look_up(source, options, use_cache=use_cache, given=plan)
        info = lookup.info
        n_out = media.frames_needed(info.fps, audio.size / sample_rate)
        n_src = max(1, min(n_out, info.n_frames))

        t = time.perf_counter()
        stats: dict = {}
        if n_src < info.n_frames:
            # the answer ends before the clip does: frames are decoded as the answer takes them, so
            # its first frames are out before the rest are decoded
            frames = media.FramesOnDemand(source.data, n_src,
                                          lambda frame: downscale(frame[None], options.resize_factor)[0])
            stats = frames.counters
        else:
            frames = media.decode_frames(source.data, count=n_src, stats=stats)
            if len(frames) == 0:
                raise InvalidMedia("the video stream holds no decodable frame")
            n_src = len(frames)
            frames = downscale(frames, options.resize_factor)
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t

        plan = self.planner.settle(lookup, n_src, frames_from(frames, options.resize_factor), timings)
        detected = 0 if plan is lookup.given else plan.detected_frames

        # mel windows, one per output frame
        t = time.perf_counter()
        mel, starts = mel_for_output(melspectrogram(to_16k(audio, sample_rate)), n_out, info.fps)
        timings["mel"] = timings.get("mel", 0.0) + time.perf_counter() - t

        height, width = frames.shape[1:3]
        face_boxes = np.round(plan.boxes[:n_src].astype(np.float64) / options.resize_factor).astype(np.int64)
        crop_boxes = padded_crop_boxes(face_boxes, options.pads, width, height)
        source_of = pingpong_indices(n_out, n_src)
        present = np.asarray(plan.present[:n_src], dtype=bool)
        rendering = Rendering(
            frames=self._synced_frames(frames, crop_boxes, face_boxes, present, source_of, mel, starts, timings,
                                       first_batch),
            source=frames, source_of=source_of, passed_through=~present[source_of], info=info, plan=plan,
            detected_frames=detected, cache_hit=plan.cached, decoded=stats,
        )
        return rendering, mel

    def sync(self, video: SourceVideo | bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
             plan: FacePlan | None = None, *, use_cache: bool = True) -> SyncResult:
        """Redraw the mouth of `video` to `audio`; an mp4 (H.264 + AAC) as long as the audio (+-1 frame).

        `use_cache=False` neither reads nor fills the face cache (the warm-up)."""
        *_, result = self._answer(video, audio, sample_rate, options, plan, use_cache=use_cache, streamed=False)
        return result

    def sync_stream(self, video: SourceVideo | bytes, audio: np.ndarray, sample_rate: int, options: LipSyncOptions,
                    plan: FacePlan | None = None) -> Iterator[bytes | SyncResult]:
        """`sync` as a fragmented MP4 (lipserve.media.fragments): bytes as each piece is encoded, then
        the SyncResult (its `mp4` empty: the pieces are the file). Frames are rendered as the
        pieces are taken, so the first fragment leaves while the rest is still being made."""
        return self._answer(video, audio, sample_rate, options, plan, use_cache=True, streamed=True)

    def _answer(self, video, audio, sample_rate: int, options: LipSyncOptions, plan: FacePlan | None, *,
                use_cache: bool, streamed: bool) -> Iterator[bytes | SyncResult]:
        t_start = time.perf_counter()
        timings = {k: 0.0 for k in ("decode", "detect", "mel", "model", "paste", "encode")}
        # a stream's first batch makes just the first fragment's frames and the one that closes it
        first_batch = FIRST_FRAGMENT_FRAMES + 1 if streamed else None
        rendering, _ = self.render(video, audio, sample_rate, options, plan, timings, use_cache=use_cache,
                                   first_batch=first_batch)
        info = rendering.info
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        frames = self._pulled(rendering.frames, t_start, timings)
        colour = info.colour.for_output()
        if streamed:
            pieces = stream_mp4(frames, info.fps, audio, int(sample_rate), colour=colour)
        else:
            pieces = iter([media.encode_mp4(frames, info.fps, audio, int(sample_rate), colour=colour)])
        mp4 = b""  # a whole answer's one piece; a streamed answer's pieces are the caller's to keep
        while True:
            # only the time spent making pieces counts, not the time the caller holds one
            t, before = time.perf_counter(), timings["model"] + timings["paste"]
            piece = next(pieces, None)
            # the frames are produced lazily inside the encoder's loop: separate the two
            timings["encode"] += time.perf_counter() - t - (timings["model"] + timings["paste"] - before)
            if piece is None:
                break
            if streamed and "first_fragment" not in timings and b"moof" in piece:
                timings["first_fragment"] = time.perf_counter() - t_start
            if not streamed:
                mp4 = piece
            yield piece
        # frames decoded on demand were decoded where the frame loop first took them, mostly inside
        # its crop-and-paste step: their time is decode time
        on_demand = rendering.decoded.get("seconds", 0.0)
        timings["decode"] += on_demand
        timings["paste"] = max(0.0, timings["paste"] - on_demand)
        n_out = len(rendering.source_of)
        passed = int(rendering.passed_through.sum())
        log.info("lip sync: %d output frames from %d decoded source frames (%s, %s, %d detections, %d passed "
                 "through%s)", n_out, rendering.decoded_frames, rendering.plan.detector, rendering.plan.mode,
                 rendering.detected_frames, passed, ", streamed" if streamed else "")
        yield SyncResult(
            mp4=mp4, duration_s=n_out / info.fps, n_frames=n_out,
            decoded_frames=rendering.decoded_frames, detected_frames=rendering.detected_frames, timings=timings,
            synthetic_weights=self.synthetic_weights, face_cache_hit=rendering.cache_hit, frames_passed_through=passed,
            face_mode=rendering.plan.mode, warnings=self._warnings(rendering), precision=self.precision_name,
        )

    def _warnings(self, rendering: Rendering) -> list[str]:
        notes = []
        kept_anyway = precision.precision_warning(self.precision_name, self.precision_gap)
        if self.autocast is not None and kept_anyway is not None:
            notes.append(kept_anyway)
        if rendering.plan.detector == HaarDetector.name:
            notes.append(HAAR_WARNING.format(folder=self.settings.runtime.weights_dir))
        passed = rendering.passed_through
        if passed.any():
            spans = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in frame_ranges(passed)[:6])
            more = ", ..." if len(frame_ranges(passed)) > 6 else ""
            notes.append(f"no face in {int(passed.sum())} of {len(passed)} output frames (frames {spans}{more}): "
                         "they are passed through as in the source, without lip sync")
        return notes

    # ------------------------------------------------------------------ the loop

    def _synced_frames(self, frames: np.ndarray, crop_boxes: np.ndarray, face_boxes: np.ndarray, present: np.ndarray,
                       source_of: np.ndarray, mel: np.ndarray, starts: np.ndarray, steps: dict,
                       first_batch: int | None = None) -> Iterator[np.ndarray]:
        """frame_loop.synced_frames through this stage's shared Wav2Lip forward, batch size and device."""
        return synced_frames(frames, crop_boxes, face_boxes, present, source_of, mel, starts, steps,
                             forward=self.wav2lip, batch_size=self.batch_size, device=self.device,
                             tensor_ops=self.tensor_ops, first_batch=first_batch)

    def _forward(self, windows: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """One Wav2Lip forward (B,1,80,16 mel windows + B,6,96,96 faces -> B,3,96,96) in the precision
        settled at load; requests reach it through self.wav2lip, which may merge their batches."""
        return self._run(windows, faces, self.autocast)

    def _run(self, windows: torch.Tensor, faces: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
        """One Wav2Lip forward under `autocast` (None: full precision, on the fast graph where chosen at load)."""
        with torch.inference_mode():
            if autocast is not None:
                with torch.autocast(self.device.type, dtype=autocast):
                    predictions = self.model(windows, faces)  # autocast: eager modules only
            else:
                predictions = self.lip_model(windows, faces)
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
