"""Wav2Lip's audio front end: the mel spectrogram it was trained on, and the per-video-frame mel windows.

Equal to the official `audio.melspectrogram` with its `hparams.py` values, as it ran under
librosa 0.7 (reference golden: tests/reference/wav2lip/golden_audio.npz):

  16 kHz mono -> preemphasis y[n] = x[n] - 0.97 x[n-1] (float64)
  -> STFT: n_fft 800, hop 200 (80 frames/s), periodic Hann window 800, centred with REFLECT padding
     (librosa >= 0.10 pads with zeros by default, which moves the edge frames by up to 2.0), result
     complex64 like librosa 0.7
  -> |STFT| -> 80 Slaney mel bands, 55..7600 Hz -> 20 log10(max(1e-5, .)) - 20 dB
  -> map [-100, 0] dB linearly onto [-4, 4] and clip.

The STFT is done here with numpy (the same arithmetic librosa 0.7 did); librosa only builds the
mel filter bank, once.
"""
from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import scipy.signal

from ..errors import InvalidAudio, InvalidMedia

SAMPLE_RATE = 16000
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0

MEL_FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH  # 80.0
MEL_STEP = 16  # frames per model input window: 0.2 s


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """[80, 401] float32 Slaney mel filter bank (read-only, built once)."""
    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX,
                                htk=False, norm="slaney", dtype=np.float32)
    basis.setflags(write=False)
    return basis


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # periodic ("fftbins") Hann, as scipy.signal.get_window('hann', N) gives it to librosa
    window = scipy.signal.get_window("hann", WIN_LENGTH, fftbins=True).astype(np.float64)
    window.setflags(write=False)
    return window


def preemphasize(wav: np.ndarray) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1], float64 (scipy's lfilter, as the official code computes it)."""
    return scipy.signal.lfilter([1.0, -PREEMPHASIS], [1.0], np.asarray(wav, dtype=np.float64))


def stft_magnitude(y: np.ndarray) -> np.ndarray:
    """|STFT| [401, 1 + len(y)//200] float32: centred, reflect-padded, computed in float64, stored complex64."""
    padded = np.pad(y, N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(padded) - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]  # [T, 800] view
    spectrum = np.fft.rfft(frames * _hann_window(), axis=1).astype(np.complex64)  # librosa 0.7's dtype
    return np.abs(spectrum).T  # [401, T]


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """[80, T] float32 in [-4, 4], T = 1 + len(wav) // 200, for mono 16 kHz audio."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise InvalidAudio(f"expected mono audio (one channel), got an array of shape {wav.shape}")
    if wav.size < 2:
        raise InvalidAudio("the speech is empty")
    if not np.all(np.isfinite(wav)):
        raise InvalidAudio("the speech contains NaN or infinite samples")

    magnitude = stft_magnitude(preemphasize(wav))
    # float32 like the official np.dot; einsum's own loop rather than BLAS: same figures whatever the
    # BLAS thread count, and no multi-threaded BLAS wake-up (tens of ms on a busy machine) for 5 MFLOP
    mel = np.einsum("mf,ft->mt", mel_basis(), magnitude)
    # float32 throughout from here, as under numpy 1.x value-based casting in the official code
    floor = np.float32(10.0 ** (MIN_LEVEL_DB / 20.0))
    db = np.float32(20.0) * np.log10(np.maximum(floor, mel)) - np.float32(REF_LEVEL_DB)
    scale = np.float32(2.0 * MAX_ABS_VALUE / -MIN_LEVEL_DB)
    normalized = scale * (db - np.float32(MIN_LEVEL_DB)) - np.float32(MAX_ABS_VALUE)
    return np.clip(normalized, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32, copy=False)


def mel_chunk_starts(n_mel_frames: int, fps: float, step: int = MEL_STEP) -> np.ndarray:
    """First mel frame of each video frame's window, int64, exactly as the official inference loop.

    Frame i starts at int(i * 80 / fps); the loop stops at the first window that would run past
    the end and puts one last window flush with the end instead (start n - step). So the output
    has one frame per start, and runs up to ~0.2 s shorter than the audio.
    """
    if not (np.isfinite(fps) and fps > 0):
        raise InvalidMedia(f"the video's frame rate ({fps}) is not a positive number")
    if n_mel_frames < step:
        raise InvalidAudio(
            f"the speech is too short for lip sync: {n_mel_frames} mel frames, at least {step} "
            f"({step / MEL_FRAMES_PER_SECOND:.2f} s) are needed"
        )
    frames_per_video_frame = MEL_FRAMES_PER_SECOND / fps  # the official 80./fps, a Python float
    starts = []
    i = 0
    while True:
        start = int(i * frames_per_video_frame)
        if start + step > n_mel_frames:
            starts.append(n_mel_frames - step)
            break
        starts.append(start)
        i += 1
    return np.asarray(starts, dtype=np.int64)


def mel_chunks(mel: np.ndarray, fps: float, step: int = MEL_STEP) -> np.ndarray:
    """[N, 80, step] float32 windows, one per output video frame (add a channel axis for the model)."""
    starts = mel_chunk_starts(mel.shape[1], fps, step)
    windows = np.lib.stride_tricks.sliding_window_view(mel, step, axis=1)  # [80, T-step+1, step] view
    return np.ascontiguousarray(windows[:, starts].transpose(1, 0, 2), dtype=np.float32)
