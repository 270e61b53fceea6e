"""Speech-stage speed on this machine: piper's real-time factor, espeak-ng, and the cache.

Real-time factor = synthesis wall time / seconds of speech produced (lower is faster; 0.25 is
4x faster than real time). Times include post-processing (resample, trim, loudness).
Run: `python benchmarks/bench_tts.py [--repeats N] [--threads T]`.
"""
from __future__ import annotations

import argparse
import os
import time

from lipserve.settings import Settings
from lipserve.tts import SpeechSynthesizer

TEXTS = {
    "word": "Hello",
    "sentence": "The quick brown fox jumps over the lazy dog.",
    "paragraph": ("Speech synthesis turns written text into sound. This sentence is here to make the "
                  "input long enough that fixed costs stop mattering, and the real-time factor shows."),
}


def best_of(fn, repeats: int) -> tuple[float, object]:
    result, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    args = parser.parse_args()

    settings = Settings(tts_order=["piper", "espeak"], tts_cache_size=0, torch_threads=args.threads)
    start = time.perf_counter()
    synth = SpeechSynthesizer(settings)
    built = time.perf_counter() - start
    start = time.perf_counter()
    synth.preload()
    loaded = time.perf_counter() - start
    print(f"cpu cores: {os.cpu_count()}, onnxruntime threads: {args.threads or 'default'}")
    print(f"engines found in {built:.2f} s; piper voice loaded in {loaded:.2f} s; available: {synth.available_engines()}")

    engines = [("piper", "en")] + ([("espeak", "en"), ("espeak", "ko")] if "espeak" in synth.available_engines() else [])
    for engine, language in engines:
        for label, text in TEXTS.items():
            if language == "ko":
                label, text = "ko " + label, {"word": "안녕", "sentence": "테스트 문장입니다. 오늘 날씨가 좋네요.",
                                              "paragraph": "음성 합성은 글을 소리로 바꿉니다. " * 4}[label]
            wall, result = best_of(lambda: synth.synthesize(text, language, engine), args.repeats)
            seconds = result.duration_s
            print(f"{engine:6s} {label:14s} {len(text):4d} chars -> {seconds:5.2f} s speech in {wall:6.3f} s "
                  f"(RTF {wall / seconds:.3f}, {seconds / wall:5.1f}x real time)")

    cached = SpeechSynthesizer(settings.replace(**{"tts_cache_size": 16}),
                               engines=synth.engines)
    cached.synthesize(TEXTS["sentence"], "en", "piper")
    wall, result = best_of(lambda: cached.synthesize(TEXTS["sentence"], "en", "piper"), args.repeats)
    print(f"cache hit: {wall * 1000:.2f} ms (cached={result.cached})")


if __name__ == "__main__":
    main()
