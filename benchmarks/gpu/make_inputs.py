"""The device check's inputs, made on the build machine and carried (TTS is not a GPU stage).

    clip.mp4        10 s, 640x360, 25 fps, a real face (devtools.testmedia) with a speech-like track
                    (the voice stage takes the user's voice from it)
    speech_2s.wav   English speech from the offline TTS (piper), padded with silence to exactly 2 s
    speech_10s.wav  the same for 10 s
    inputs.json     what made them

Without piper (or with --synthetic-speech) the speech is testmedia.speechlike: shaped like speech,
not speech; inputs.json says which.

Usage: .venv/bin/python benchmarks/gpu/make_inputs.py --out .whl/inputs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CLIP_SECONDS, CLIP_SIZE, CLIP_FPS = 10.0, (640, 360), 25
RATE = 16000
TEXTS = {
    2: "Hello there, nice to meet you.",
    10: ("Good morning everyone. Today I want to tell you about a small project of mine. "
         "It turns a short video and a line of text into a new video, where that person says the line."),
}


def fit(audio: np.ndarray, seconds: float) -> np.ndarray:
    """Pad with silence (or cut with a 50 ms fade) to exactly `seconds` at RATE."""
    n = int(round(seconds * RATE))
    audio = np.asarray(audio, dtype=np.float32)[:n]
    if audio.size == n:
        fade = min(n, RATE // 20)
        audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return np.pad(audio, (0, n - audio.size))


def speech(seconds: int, synthetic: bool) -> tuple[np.ndarray, str]:
    from devtools import testmedia

    if not synthetic:
        try:
            from lipserve.settings import Settings
            from lipserve.tts import SpeechSynthesizer

            result = SpeechSynthesizer(Settings(tts_order=["piper"])).synthesize(TEXTS[seconds], "en", "piper")
            audio = result.audio
            if result.sample_rate != RATE:
                import scipy.signal

                audio = scipy.signal.resample_poly(audio, RATE, result.sample_rate)
            return fit(audio, seconds), f"piper ({result.voice}): {TEXTS[seconds]!r}"
        except Exception as exc:  # noqa: BLE001 - recorded in inputs.json, then the fallback is used
            print(f"piper unavailable ({type(exc).__name__}: {exc}); using speech-like noise", file=sys.stderr)
    return fit(testmedia.speechlike(float(seconds), RATE, seed=seconds), seconds), "testmedia.speechlike (not speech)"


def write_wav(path: Path, audio: np.ndarray) -> None:
    import scipy.io.wavfile

    scipy.io.wavfile.write(path, RATE, (np.clip(audio, -1, 1) * 32767).astype(np.int16))


def make(out: Path, synthetic_speech: bool = False) -> dict:
    from devtools import testmedia

    out.mkdir(parents=True, exist_ok=True)
    clip = testmedia.astronaut_clip(seconds=CLIP_SECONDS, fps=CLIP_FPS, size=CLIP_SIZE, audio="speechlike")
    (out / "clip.mp4").write_bytes(clip)
    made = {"clip.mp4": f"testmedia.astronaut_clip {CLIP_SECONDS:g} s {CLIP_SIZE[0]}x{CLIP_SIZE[1]} {CLIP_FPS} fps, "
                        f"{len(clip)} bytes"}
    for seconds in TEXTS:
        audio, source = speech(seconds, synthetic_speech)
        write_wav(out / f"speech_{seconds}s.wav", audio)
        made[f"speech_{seconds}s.wav"] = source
    (out / "inputs.json").write_text(json.dumps(made, indent=1))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--synthetic-speech", action="store_true", help="speech-like noise instead of piper")
    args = parser.parse_args()
    for name, what in make(args.out, args.synthetic_speech).items():
        print(f"{args.out / name}: {what}")


if __name__ == "__main__":
    main()
