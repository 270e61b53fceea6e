"""Engine output -> what the voice stage wants: 16 kHz mono float32, trimmed, at a set loudness.

Also the reader for espeak-ng's streamed WAV (gTTS's MP3 goes through lipserve.media).
"""
from __future__ import annotations

import struct
from math import gcd

import numpy as np
from scipy.signal import resample_poly

from lipserve.tts.base import EngineAudio

TARGET_RATE = 16000
MARGIN_S = 0.05  # silence kept before the first and after the last sound
TARGET_RMS_DBFS = -20.0  # loudness of the voiced part
PEAK_LIMIT = 0.95  # never scale a peak above this
SILENCE_BELOW_DB = 40.0  # frames this far under the loudest frame count as silence
_FRAME_S = 0.01


def parse_wav(data: bytes) -> EngineAudio:
    """PCM WAV -> mono float32. Tolerates the placeholder sizes a streamed WAV (espeak-ng
    --stdout) carries in its header: the data chunk runs to the end of the bytes."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if tag == b"fmt ":
            fmt = struct.unpack("<HHIIHH", data[body:body + 16])
        elif tag == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            audio_format, channels, rate, _, _, bits = fmt
            if audio_format != 1 or bits != 16:
                raise ValueError(f"unsupported WAV encoding (format {audio_format}, {bits} bits)")
            payload = data[body:min(len(data), body + size)]
            payload = payload[: len(payload) // (2 * channels) * (2 * channels)]
            pcm = np.frombuffer(payload, dtype="<i2").reshape(-1, channels)
            samples = pcm.astype(np.float32).mean(axis=1) / 32768.0
            return EngineAudio(samples=samples.astype(np.float32), sample_rate=int(rate))
        pos = body + size + (size & 1)
    raise ValueError("WAV has no data chunk")


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return samples.astype(np.float32, copy=False)
    g = gcd(int(rate), int(target))
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def trim_silence(samples: np.ndarray, rate: int, margin_s: float = MARGIN_S) -> np.ndarray:
    """Cut leading/trailing silence down to `margin_s`. All-silent input gives an empty array."""
    frame = max(1, int(rate * _FRAME_S))
    n = len(samples) // frame
    if n == 0:
        return samples[:0]
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1))
    # relative threshold, with an absolute floor so near-zero noise is never "speech"
    threshold = max(rms.max() * 10 ** (-SILENCE_BELOW_DB / 20), 1e-4)
    loud = np.flatnonzero(rms > threshold)
    if loud.size == 0:
        return samples[:0]
    margin = int(round(margin_s * rate))
    start = max(0, loud[0] * frame - margin)
    end = min(len(samples), (loud[-1] + 1) * frame + margin)
    return samples[start:end]


def normalize_loudness(samples: np.ndarray, rate: int) -> np.ndarray:
    """Scale so the voiced frames sit at TARGET_RMS_DBFS, the peak staying under PEAK_LIMIT."""
    if samples.size == 0:
        return samples
    frame = max(1, int(rate * _FRAME_S))
    n = max(1, len(samples) // frame)
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, -1) ** 2, axis=1))
    voiced = rms[rms > rms.max() * 10 ** (-SILENCE_BELOW_DB / 20)]
    level = float(np.sqrt(np.mean(voiced ** 2))) if voiced.size else 0.0
    peak = float(np.abs(samples).max())
    if level <= 0.0 or peak <= 0.0:
        return samples
    gain = min(10 ** (TARGET_RMS_DBFS / 20) / level, PEAK_LIMIT / peak)
    return (samples * gain).astype(np.float32)


def finish(audio: EngineAudio) -> np.ndarray:
    """Resample to 16 kHz mono float32, trim silence to the margin, normalise loudness."""
    x = np.asarray(audio.samples, dtype=np.float32)
    if x.ndim != 1:
        x = x.reshape(len(x), -1).mean(axis=1)
    x = np.nan_to_num(x)
    x = resample(x, audio.sample_rate, TARGET_RATE)
    x = trim_silence(x, TARGET_RATE)
    x = normalize_loudness(x, TARGET_RATE)
    return np.ascontiguousarray(x, dtype=np.float32)
