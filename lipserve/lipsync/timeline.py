"""The answer's timeline: which source frame and which mel window each output frame gets."""
from __future__ import annotations

import math

import numpy as np
import scipy.signal

from ..audio.wav2lip_mel import MEL_FRAMES_PER_SECOND, MEL_STEP, SAMPLE_RATE

SILENT_MEL = -4.0  # the floor of Wav2Lip's normalised mel scale: what silence gives


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


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """`audio` at the 16 kHz the mel is computed at."""
    if sample_rate == SAMPLE_RATE:
        return audio
    g = math.gcd(int(sample_rate), SAMPLE_RATE)
    return scipy.signal.resample_poly(audio, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)


def downscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """The source frames at 1/factor of their size (the resize_factor option), as the answer is made."""
    if factor == 1:
        return frames
    import cv2

    height, width = frames.shape[1:3]
    size = (max(2, width // factor), max(2, height // factor))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
