"""Warm-up: run every request path of a stage once, on small synthetic inputs, before it takes traffic.

The first call of each path pays costs that later calls do not: lazy imports (librosa's
feature and effects modules pull in numba, scikit-learn and more on first use), oneDNN's first
execution of the LSTM and conv kernels, first allocations of the big activation buffers, the
ONNX session's first run, the H.264 encoder's set-up. A stage that pays them in its constructor
answers its first request as fast as its tenth.

The inputs are synthetic and shaped like real ones: a 640x360 25 fps H.264 + AAC clip whose
audio track is speech-like (so the reference-voice check accepts it) and whose picture holds
no face (drifting colour bands over fixed grain: face finding runs to its "no face" answer;
lip sync is then given a box), and speech-like 16 kHz audio, both built here from numpy and
the public media encoder alone. Each stage's `warm_up()` goes through its public methods, so it
warms whatever path the settings chose, and leaves its caches as they were.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


WARMUP_FPS = 25.0
WARMUP_SIZE = (640, 360)  # (width, height): the common phone-landscape source
WARMUP_RATE = 16000
WARMUP_CLIP_RATE = 44100  # the clip's AAC track at a phone's rate, resampled on reading as real video is
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
    # PyAV only once a stage warms up; the encoder module's own function, so that what counts or
    # wraps lipserve.media.encode_mp4 sees the requests' encodes, not this clip's
    from .media.encode import encode_mp4

    seconds = float(seconds)
    n_frames = max(1, round(seconds * WARMUP_FPS))
    frames = (faceless_frame(i / WARMUP_FPS, WARMUP_SIZE) for i in range(n_frames))
    track = speechlike(seconds, WARMUP_CLIP_RATE, WARMUP_SEED)
    video = encode_mp4(frames, WARMUP_FPS, track, WARMUP_CLIP_RATE)
    speech = speechlike(seconds, WARMUP_RATE, WARMUP_SEED)
    speech.flags.writeable = False
    width, height = WARMUP_SIZE
    side = height // 3
    box = (width // 2 - side // 2, height // 2 - side // 2, width // 2 + side // 2, height // 2 + side // 2)
    return WarmupInputs(video, speech, WARMUP_RATE, WARMUP_FPS, WARMUP_SIZE, box)


def faceless_frame(t: float, size: tuple[int, int]) -> np.ndarray:
    """The warm-up picture at t seconds: vertical colour bands drifting sideways over a vertical
    gradient and fixed grain, RGB uint8. Texture and motion for the encoder, nothing face-like."""
    width, height = size
    x = np.linspace(0.0, 6 * np.pi, width, dtype=np.float32)[None, :, None] - 2.0 * t
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    phases = np.array([0.0, 2.1, 4.2], np.float32)
    bands = 120 + 50 * np.sin(x + phases) + 40 * y
    return np.clip(bands + _grain(width, height), 0, 255).astype(np.uint8)


@lru_cache(maxsize=2)
def _grain(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(WARMUP_SEED).normal(0, 3, size=(height, width, 1)).astype(np.float32)


def speechlike(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """A voiced, speech-shaped signal: a gliding ~120 Hz glottal source with formant-shaped
    harmonics, cut into 4-6 Hz syllables grouped into words with short pauses; float32 mono,
    peak 0.5, the same for the same arguments.

    Voiced on purpose: silence trimmers and voice-activity checks keep it, as they would speech.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 120 + 18 * np.sin(2 * np.pi * 0.7 * t) + 6 * np.sin(2 * np.pi * 5.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    # Formants drift slowly so the spectrum changes like vowels do.
    formants = [(600 + 200 * np.sin(2 * np.pi * 1.3 * t), 120), (1500 + 400 * np.sin(2 * np.pi * 0.9 * t + 1), 180),
                (2600, 250)]
    voiced = np.zeros(n)
    for k in range(1, 40):
        freq = k * f0
        if np.all(freq > sample_rate / 2 - 200):
            break
        gain = sum(np.exp(-0.5 * ((freq - fc) / bw) ** 2) for fc, bw in formants) + 0.05 / k
        gain = np.where(freq < sample_rate / 2 - 200, gain, 0.0)
        voiced += gain * np.sin(k * phase)
    # Syllable envelope: words of 2-4 syllables (0.14-0.26 s each), pauses of 0.12-0.3 s.
    envelope = np.zeros(n)
    pos = int(0.15 * sample_rate)
    while pos < n:
        for _ in range(rng.integers(2, 5)):
            length = int(rng.uniform(0.14, 0.26) * sample_rate)
            end = min(n, pos + length)
            envelope[pos:end] = np.sin(np.pi * np.arange(end - pos) / length) ** 0.7 * rng.uniform(0.6, 1.0)
            pos = end
        pos += int(rng.uniform(0.12, 0.3) * sample_rate)
    signal = voiced * envelope + rng.normal(0, 1e-3, n)
    return (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)


class WarmupReport(dict):
    """path -> seconds its warm-up call took, in the order they ran."""

    @contextmanager
    def path(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 4)
