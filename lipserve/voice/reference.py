"""The reference voice: the user's own speech, taken from their video's audio track (or a given file).

As FreeVC's `convert.py` does with its target file: 16 kHz mono (the mean of the channels, as
`librosa.load` makes it; lipserve.media decodes that way), leading and trailing silence trimmed
with `librosa.effects.trim(top_db=20)` as FreeVC's pinned librosa 0.8 computes it (see
`trim_silence`). Before that we check there is voiced speech at all, since a silent or missing
track would otherwise yield an arbitrary "voice".
"""
from __future__ import annotations

import librosa
import numpy as np

from ..errors import NoVoiceFound

SAMPLE_RATE = 16000
TRIM_TOP_DB = 20  # convert.py's value
TRIM_FRAME_LENGTH = 2048  # librosa.effects.trim's defaults, which convert.py keeps
TRIM_HOP_LENGTH = 512
MIN_VOICED_SECONDS = 0.25
SILENCE_DBFS = -55.0  # frames quieter than this (RMS, re full scale) count as silence outright
RELATIVE_DB = 30.0  # ... and so do frames this far below the loudest frame
MAX_VOICED_ZCR = 0.3  # white noise crosses zero on ~half the samples; voiced speech far less often
# below these the speaker embedding rests on little evidence: the response warns (the request still runs)
SHORT_REFERENCE_SECONDS = 1.6  # the speaker encoder's window; shorter speech is zero-padded to fill it
LITTLE_VOICED_SECONDS = 1.0  # of voiced 25 ms frames (see voiced_seconds), after trimming
HINT = ("The voice stage clones the speaker's voice from it. Use a video in which the person speaks, "
        "or name a separate recording of their voice in `options.reference_audio`.")


def voiced_seconds(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Seconds of 25 ms frames (10 ms hop) loud enough and tonal enough to be voiced speech."""
    frame, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    if wav.size < frame:
        return 0.0
    rms = librosa.feature.rms(y=wav, frame_length=frame, hop_length=hop, center=False)[0]
    zcr = librosa.feature.zero_crossing_rate(wav, frame_length=frame, hop_length=hop, center=False)[0]
    floor = max(10 ** (SILENCE_DBFS / 20), float(rms.max()) * 10 ** (-RELATIVE_DB / 20))
    voiced = (rms > floor) & (zcr < MAX_VOICED_ZCR)
    return float(voiced.sum()) * hop / sample_rate


def trim_silence(wav: np.ndarray, top_db: float = TRIM_TOP_DB) -> np.ndarray:
    """Cut leading and trailing frames more than `top_db` below the loudest frame, as librosa 0.8 did.

    Frames are 2048 samples every 512, centred, and their RMS is taken with the signal reflected
    at both ends. librosa 0.9 changed that padding to zeros (the librosa installed here does so),
    which halves the power of the first and last frames: speech that starts or stops right at the
    file's edge then loses up to a frame (32 ms at 16 kHz) that FreeVC keeps.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        return wav
    rms = librosa.feature.rms(y=wav, frame_length=TRIM_FRAME_LENGTH, hop_length=TRIM_HOP_LENGTH,
                              center=True, pad_mode="reflect")[0]
    floor = 1e-5  # librosa's amin for amplitudes (1e-10 in power)
    level_db = 20 * np.log10(np.maximum(rms, floor)) - 20 * np.log10(max(float(rms.max()), floor))
    kept = np.flatnonzero(level_db > -top_db)
    if kept.size == 0:
        return wav[:0]
    start = int(kept[0]) * TRIM_HOP_LENGTH
    stop = min(wav.size, (int(kept[-1]) + 1) * TRIM_HOP_LENGTH)
    return wav[start:stop]


def prepare_reference(wav: np.ndarray | None, what: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Check for voiced speech, then trim silence; NoVoiceFound (422) naming what is missing."""
    if wav is None:
        raise NoVoiceFound(f"The {what} has no audio track, so there is no voice to clone. {HINT}")
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        raise NoVoiceFound(f"The {what} has an empty audio track, so there is no voice to clone. {HINT}")
    if not np.isfinite(wav).all():
        raise NoVoiceFound(f"The {what}'s audio contains invalid (non-finite) samples. {HINT}")
    voiced = voiced_seconds(wav, sample_rate)
    if voiced < MIN_VOICED_SECONDS:
        peak = float(np.abs(wav).max())
        peak_db = 20 * np.log10(peak) if peak > 0 else float("-inf")
        raise NoVoiceFound(
            f"No voiced speech found in the {what}'s audio ({wav.size / sample_rate:.1f} s, peak {peak_db:.0f} dBFS, "
            f"{voiced:.2f} s voiced; at least {MIN_VOICED_SECONDS} s needed). {HINT}")
    return np.ascontiguousarray(trim_silence(wav), dtype=np.float32)


def reference_warnings(reference: np.ndarray, sample_rate: int = SAMPLE_RATE) -> list[str]:
    """What the response should say about a trimmed reference that is usable but thin."""
    warnings = []
    seconds = reference.size / sample_rate
    if seconds < SHORT_REFERENCE_SECONDS:
        warnings.append(f"The voice reference holds only {seconds:.1f} s of speech after trimming silence; the "
                        f"speaker encoder looks at {SHORT_REFERENCE_SECONDS} s windows, so the cloned voice may be "
                        f"off. Use a video (or options.reference_audio) with a few seconds of speech.")
    voiced = voiced_seconds(reference, sample_rate)
    if voiced < LITTLE_VOICED_SECONDS:
        warnings.append(f"The voice reference has little voiced speech ({voiced:.2f} s; {LITTLE_VOICED_SECONDS} s "
                        f"or more recommended), so the cloned voice may be off. Use a recording in which the person "
                        f"speaks clearly.")
    return warnings


def reference_from_video(data: bytes) -> np.ndarray:
    """16 kHz silence-trimmed reference voice from a video's audio track; NoVoiceFound when absent/silent."""
    from .. import media  # the media module pulls in PyAV; import it only when a reference is decoded

    return prepare_reference(media.read_audio(data, SAMPLE_RATE), "video")


def reference_from_audio(data: bytes) -> np.ndarray:
    """The same from a separate recording (any audio file, or a video); InvalidAudio if undecodable."""
    from .. import media

    return prepare_reference(media.decode_audio_bytes(data, SAMPLE_RATE), "reference audio")
