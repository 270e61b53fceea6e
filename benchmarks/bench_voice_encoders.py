"""Voice-stage encoders on this machine: WavLM-Large content features and the speaker embedding.

Runs the real architectures on SYNTHETIC weights (timings are real, outputs are not meaningful):
  * building WavLM-Large with its synthetic weights (mostly generating 315 M detinit values),
  * WavLM-Large extract_features on 2 s and 10 s of audio (best of N, after a warm-up call),
  * optionally (--long) 60 s through extract_features_chunked, with peak memory,
  * the speaker embedding of a 3 s reference (the first call includes librosa's one-time set-up).
For reference, the official WavLM-Large takes about 0.68 s for 2 s of audio on this machine.
Run: `python benchmarks/bench_voice_encoders.py [--repeats N] [--threads T] [--long]`.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from lipserve.settings import Settings
from lipserve.voice.loaders import load_speaker_encoder, load_wavlm
from lipserve.voice.speaker import embed_utterance


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    noise = np.random.default_rng(seed).uniform(-1, 1, t.size)
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + 0.05 * noise).astype(np.float32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--long", action="store_true", help="also 60 s through the chunked path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, SYNTHETIC weights")

    with tempfile.TemporaryDirectory() as empty_weights_dir:
        settings = Settings(weights_dir=empty_weights_dir, allow_synthetic_weights=True, device="cpu")
        start = time.perf_counter()
        wavlm, _ = load_wavlm(settings)
        print(f"WavLM-Large build + synthetic weights: {time.perf_counter() - start:.2f} s "
              f"({sum(p.numel() for p in wavlm.parameters()) / 1e6:.2f} M parameters)")
        start = time.perf_counter()
        encoder, _ = load_speaker_encoder(settings)
        print(f"speaker encoder build + synthetic weights: {time.perf_counter() - start:.3f} s")

    with torch.inference_mode():
        for seconds in (2.0, 10.0):
            wav = torch.from_numpy(speechlike(seconds))[None]
            wavlm.extract_features(wav)  # warm-up (allocator, kernels)
            took = best_of(lambda: wavlm.extract_features(wav), args.repeats)
            print(f"WavLM-Large extract_features, {seconds:4.1f} s audio: {took:.3f} s "
                  f"(real-time factor {took / seconds:.3f})")
        if args.long:
            wav = torch.from_numpy(speechlike(60.0))[None]
            start = time.perf_counter()
            out = wavlm.extract_features_chunked(wav)
            print(f"WavLM-Large extract_features_chunked, 60 s audio: {time.perf_counter() - start:.2f} s, "
                  f"{out.shape[1]} frames")
    print(f"peak RSS so far: {peak_rss_gib():.2f} GiB")

    reference = speechlike(3.0, seed=1)
    start = time.perf_counter()
    embed_utterance(encoder, reference)
    print(f"speaker embedding, 3 s reference, first call (librosa set-up included): {time.perf_counter() - start:.3f} s")
    took = best_of(lambda: embed_utterance(encoder, reference), args.repeats)
    print(f"speaker embedding, 3 s reference: {took:.4f} s")


if __name__ == "__main__":
    main()
