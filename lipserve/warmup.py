"""Warm-up: run every request path of a stage once, on small synthetic inputs, before it takes traffic.

The first call of each path pays costs that later calls do not (measured, issue 16): lazy
imports (librosa's feature and effects modules pull in numba, scikit-learn and more on first
use), oneDNN's first execution of the LSTM and conv kernels, first allocations of the big
activation buffers, the ONNX session's first run, the H.264 encoder's set-up. A stage that pays
them in its constructor answers its first request as fast as its tenth.

The inputs are synthetic and shaped like real ones: a 640x360 25 fps H.264 + AAC clip whose
audio track is speech-like (so the reference-voice check accepts it) and whose picture holds
no face (face finding runs to its "no face" answer; lip sync is then given a box), and
speech-like 16 kHz audio. Each stage's `warm_up()` goes through its public methods, so it warms
whatever path the settings chose, and leaves its caches as they were.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .testmedia import speechlike  # noqa: F401  (lipsync's precision probe imports it from here)

WARMUP_FPS = 25.0
WARMUP_SIZE = (640, 360)  # (width, height): the common phone-landscape source, as the old server's test clip
WARMUP_RATE = 16000
WARMUP_TEXT = "Warming up the voice."
WARMUP_SEED = 16


@dataclass(frozen=True)
class WarmupInputs:
    video: bytes            # mp4 (H.264 + AAC 44.1 kHz), `seconds` long, speech-like audio, no face
    speech: np.ndarray      # float32 mono at WARMUP_RATE, `seconds` long (read-only)
    sample_rate: int
    fps: float
    size: tuple[int, int]   # (width, height)
    box: tuple[int, int, int, int]  # a face-sized box (x1, y1, x2, y2) in the middle of the picture

    @property
    def seconds(self) -> float:
        return self.speech.size / self.sample_rate


@lru_cache(maxsize=4)
def warmup_inputs(seconds: float) -> WarmupInputs:
    """The synthetic clip and speech, `seconds` long (at least 0.5: the reference-voice check needs
    0.25 s of voiced speech), built once per length."""
    from . import testmedia  # scikit-image is only needed for the astronaut, not for these

    seconds = float(seconds)
    video = testmedia.noface_clip(seconds=seconds, fps=WARMUP_FPS, size=WARMUP_SIZE, audio="speechlike")
    speech = testmedia.speechlike(seconds, WARMUP_RATE, seed=WARMUP_SEED)
    speech.flags.writeable = False
    width, height = WARMUP_SIZE
    side = height // 3
    box = (width // 2 - side // 2, height // 2 - side // 2, width // 2 + side // 2, height // 2 + side // 2)
    return WarmupInputs(video, speech, WARMUP_RATE, WARMUP_FPS, WARMUP_SIZE, box)


class WarmupReport(dict):
    """path -> seconds its warm-up call took, in the order they ran."""

    @contextmanager
    def path(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 4)
