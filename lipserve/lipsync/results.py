"""What a lip-sync call gives back: the rendered frames before encoding, and the answer."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..media import VideoInfo
from .planner import FacePlan


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
    source: np.ndarray              # the decoded (and downscaled) source frames the answer uses (or FramesOnDemand)
    source_of: np.ndarray           # [n_out] source frame index of each output frame
    passed_through: np.ndarray      # [n_out] bool: this output frame is source[source_of[i]] untouched
    info: VideoInfo
    plan: FacePlan
    detected_frames: int
    cache_hit: bool
    decoded: dict                   # the decoder's counters ("decoded" frames; "seconds" of on-demand decoding)

    @property
    def decoded_frames(self) -> int:
        return int(self.decoded.get("decoded", 0))
