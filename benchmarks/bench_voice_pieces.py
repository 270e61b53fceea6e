"""Would converting the voice in pieces split at a pause let a streamed answer start sooner, and
how far is the pieced voice from whole-utterance conversion? (Issue 25, item 5: a study; lipserve
converts the whole utterance.)

For each speech length: TTS speech (piper), resampled to 16 kHz; the pause nearest after
FIRST_PIECE_S (the quietest 20 ms frame in a window); the whole utterance converted, then the
first piece converted with `context` seconds of the speech after the split (kept only up to the
split) and the rest with `context` seconds before it. Noise off (deterministic), so the gap is the
context the networks see, not their noise. Figures: each conversion's time (the second of two
runs, so the voice graphs know the length: see docs/FAST_PATHS.md, the length ladder), and the
pieced voice against the whole one as a signal-to-difference ratio in dB, over all of it and
within 0.2 s of the split.

The real architectures run on SYNTHETIC weights: the timings are the real work; the dB figures
bound what the architecture does with less context (WavLM attends over the whole input, so the
content of a piece differs from the whole's), not what trained weights would do.

Usage: .venv/bin/python benchmarks/bench_voice_pieces.py   (about 3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.settings import Settings  # noqa: E402
from lipserve.tts import SpeechSynthesizer  # noqa: E402
from lipserve.voice import VoiceConverter, prepare_reference  # noqa: E402

RATE = 16000
FIRST_PIECE_S = 1.5
PAUSE_WINDOW_S = (1.0, 2.5)  # where the first split is looked for
TEXTS = {2: "Hello Anna, this is me.",
         10: "Hello Bruno, this is me talking for a good while now, so that the answer lasts about ten "
             "seconds and we can see how early the first part of it starts to play."}


def quietest_point(speech: np.ndarray, window_s: tuple[float, float], frame_s: float = 0.02) -> int:
    """The sample at the middle of the quietest `frame_s` frame within `window_s` (a pause)."""
    frame = int(frame_s * RATE)
    lo, hi = int(window_s[0] * RATE), min(int(window_s[1] * RATE), speech.size - frame)
    starts = np.arange(lo, hi, frame // 2)
    energy = [float(np.mean(speech[s:s + frame] ** 2)) for s in starts]
    return int(starts[int(np.argmin(energy))] + frame // 2)


def snr_db(whole: np.ndarray, other: np.ndarray) -> float:
    diff = float(np.sum((whole - other) ** 2))
    return float("inf") if diff == 0 else 10 * np.log10(float(np.sum(whole ** 2)) / diff)


def timed(fn):
    fn()  # the first run of a length prepares the graphs for it
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0], help="seconds each side")
    args = ap.parse_args()
    print("VOICE-PIECES BENCHMARK ON SYNTHETIC WEIGHTS: the audio is NOT meaningful; the timings are the real work.")
    empty = Path(tempfile.mkdtemp(prefix="bench_pieces_no_weights"))
    settings = Settings(weights_dir=empty, allow_synthetic_weights=True, device="cpu", tts_order=["piper"])
    tts, vc = SpeechSynthesizer(settings), VoiceConverter(settings)
    reference = prepare_reference(testmedia.speechlike(3.0, RATE, seed=12), "benchmark")

    def convert(speech: np.ndarray) -> np.ndarray:
        return vc.convert(speech, RATE, reference, deterministic=True, seed=0).audio

    print(f"{'speech':>7} {'split':>6} {'context':>8} {'whole':>7} {'piece 1':>8} {'rest':>7} "
          f"{'SDR all':>8} {'SDR seam':>9}")
    for seconds, text in TEXTS.items():
        said = tts.synthesize(text, "en", seed=0)
        speech = np.asarray(said.audio, np.float32)
        if said.sample_rate != RATE:
            speech = librosa.resample(speech, orig_sr=said.sample_rate, target_sr=RATE)
        split = quietest_point(speech, PAUSE_WINDOW_S)
        whole_s, whole = timed(lambda: convert(speech))
        seam = slice(max(0, split - RATE // 5), split + RATE // 5)
        for context in args.context:
            pad = int(context * RATE)
            first_s, first = timed(lambda: convert(speech[:split + pad]))
            rest_s, rest = timed(lambda: convert(speech[max(0, split - pad):]))
            pieced = np.concatenate([first[:split], rest[split - max(0, split - pad):]])[:whole.size]
            print(f"{speech.size / RATE:6.1f}s {split / RATE:5.2f}s {context:7.2f}s {whole_s:6.2f}s {first_s:7.2f}s "
                  f"{rest_s:6.2f}s {snr_db(whole, pieced):7.1f} {snr_db(whole[seam], pieced[seam]):8.1f}")


if __name__ == "__main__":
    main()
