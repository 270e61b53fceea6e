"""Writes lipserve/voice/assets/precision_speech.flac: the voice stage's precision check input.

Two sentences from the offline TTS (seeded), 16 kHz mono, one per channel (speech, reference), so
the check at load runs on real speech without the voice stage building a TTS engine of its own.
Run once when the sentences change: `.venv/bin/python -m devtools.make_voice_probe`.
"""
from __future__ import annotations

import numpy as np
import soundfile

from lipserve.settings import Settings
from lipserve.tts import SpeechSynthesizer
from lipserve.voice.converter import CONTENT_RATE, PRECISION_SPEECH

SPEECH_TEXT = "The quick brown fox jumps over the lazy dog, and then it rests in the shade."
REFERENCE_TEXT = "I would like to hear how my own voice sounds when somebody else speaks."


def main() -> None:
    tts = SpeechSynthesizer(Settings(tts_order=["piper", "espeak"]))
    speech = tts.synthesize(SPEECH_TEXT, "en", seed=0)
    reference = tts.synthesize(REFERENCE_TEXT, "en", seed=1)
    assert speech.sample_rate == reference.sample_rate == CONTENT_RATE
    n = max(speech.audio.size, reference.audio.size)
    both = np.stack([np.pad(a.audio, (0, n - a.audio.size)) for a in (speech, reference)], axis=1)
    PRECISION_SPEECH.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(PRECISION_SPEECH, both, CONTENT_RATE, subtype="PCM_16",
                    format="FLAC")
    print(f"{PRECISION_SPEECH}: {n / CONTENT_RATE:.2f} s, {speech.engine}:{speech.voice}, "
          f"{PRECISION_SPEECH.stat().st_size} bytes")


if __name__ == "__main__":
    main()
