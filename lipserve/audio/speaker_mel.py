"""The speaker encoder's front end: 40-band power mel at 100 frames/s, and its partial windows.

Matches FreeVC's speaker_encoder (librosa 0.8 melspectrogram defaults): 25 ms Hann window
(n_fft 400), 10 ms hop, power 2, Slaney mel, no log. librosa >= 0.10 pads with zeros by
default; the official front end reflected, so pad_mode='reflect' is passed explicitly.
"""
from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)  # [40, 201], Slaney


def wav_to_mel(wav: np.ndarray) -> np.ndarray:
    """16 kHz mono waveform [T] -> power mel [frames, 40] float32, frames = T // 160 + 1."""
    wav = np.asarray(wav, dtype=np.float32)
    spectrum = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP_LENGTH, center=True, pad_mode="reflect")) ** 2
    mel = _mel_basis() @ spectrum
    return mel.astype(np.float32).T


def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75,
                   partial_frames: int = PARTIAL_FRAMES) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where the partial utterances lie: (wav_slices, mel_slices) as (start, stop) pairs.

    Windows of `partial_frames` mel frames start every 1/rate seconds; the last one is dropped
    when less than `min_coverage` of it would be real audio (unless it is the only one). The
    waveform must then be zero-padded to wav_slices[-1][1] samples before taking the mel.
    """
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    n_frames = int(np.ceil((n_samples + 1) / HOP_LENGTH))
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP_LENGTH))
    if not 0 < frame_step <= partial_frames:
        raise ValueError(f"rate {rate} gives a step of {frame_step} frames; it must be in 1..{partial_frames}")
    steps = max(1, n_frames - partial_frames + frame_step + 1)
    mel_slices = [(i, i + partial_frames) for i in range(0, steps, frame_step)]
    wav_slices = [(start * HOP_LENGTH, stop * HOP_LENGTH) for start, stop in mel_slices]
    last_start, last_stop = wav_slices[-1]
    coverage = (n_samples - last_start) / (last_stop - last_start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices
