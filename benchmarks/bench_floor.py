"""How close each network's fast path runs to this CPU's fp32 peak, and the floor that sets.

For WavLM-Large (2 s of speech), SynthesizerTrn (FreeVC, the content frames of 2 s) and
Wav2Lip (per output frame, batch 16), this counts the multiply-adds of one forward (matmuls and
convolutions, torch.utils.flop_counter on the eager module: the work every exact fp32 path must
do), measures the machine's fp32 peak as the best large sgemm it runs (torch.mm, 2048 x 2048,
every core), times the OpenVINO graph (best of --repeats), and prints:

  GFLOP per call, seconds, achieved GFLOP/s, share of the sgemm peak, and the floor: the
  seconds the same work takes at the sgemm peak, i.e. the best any fp32 path could do here.

The issue-12 targets are printed beside the floors: voice conversion at 2x the official code
(docs/FACTS.md: 0.87 s WavLM + 0.90 s synthesis for ~2 s of speech, so <= 0.885 s) and lip sync at
<= 0.035 s per output frame. A floor above a target means no fp32 path reaches it on this CPU:
it needs fewer operations or lower precision (int8 or bf16 kernels: VNNI, AVX512-BF16, AMX).

Models run on SYNTHETIC weights (real architectures; the work per call does not depend on the
weights). Run it alone on the machine (it measures peak throughput):

    flock /tmp/lipserve-heavy.lock .venv/bin/python benchmarks/bench_floor.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.settings import Settings  # noqa: E402

OFFICIAL_VOICE_2S = 0.87 + 0.90  # docs/FACTS.md: FreeVC convert.py, WavLM + synthesis, ~2 s of speech
VOICE_TARGET_S = OFFICIAL_VOICE_2S / 2
LIPSYNC_TARGET_S_PER_FRAME = 0.035
BATCH = 16


def best_seconds(fn, repeats: int) -> float:
    fn()  # first call: kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def counted_flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sgemm_peak(repeats: int) -> float:
    """GFLOP/s of the best 2048 x 2048 x 2048 fp32 matmul (2 n^3 FLOP) over every core."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = best_seconds(lambda: torch.mm(a, b), repeats + 2)
    return 2 * n ** 3 / seconds / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lipserve.fast.networks import FastSynthesizer, FastWav2Lip, FastWavLM
    from lipserve.lipsync.networks import load_wav2lip
    from lipserve.voice.loaders import load_wavlm
    from lipserve.voice.synthesizer import load_synthesizer

    print("SYNTHETIC WEIGHTS: real architectures on deterministic synthetic weights; the work per call is "
          "what matters here, not the outputs.", flush=True)
    settings = Settings(weights_dir=Path(tempfile.mkdtemp()), allow_synthetic_weights=True, device="cpu")
    threads = settings.runtime.cpu_threads()
    torch.set_num_threads(threads)
    cache = settings.runtime.fast_cache_dir
    peak = sgemm_peak(args.repeats)
    print(f"fp32 peak (best 2048^3 sgemm, {threads} threads): {peak:.1f} GFLOP/s", flush=True)

    wav = torch.from_numpy(testmedia.speechlike(2.0, 16000, seed=11))[None]
    wavlm, _ = load_wavlm(settings, "cpu")
    fast_wavlm = FastWavLM(wavlm, threads, cache)
    content = fast_wavlm.extract_features(wav).transpose(1, 2).contiguous()
    synth, _ = load_synthesizer(settings, "cpu")
    fast_synth = FastSynthesizer(synth, threads, cache)
    g = torch.nn.functional.normalize(torch.randn(1, synth.cfg.gin_channels, generator=torch.Generator().manual_seed(4)), dim=1)
    w2l, _ = load_wav2lip(settings, "cpu")
    fast_w2l = FastWav2Lip(w2l, threads, cache)
    mel, faces = torch.rand(BATCH, 1, 80, 16), torch.rand(BATCH, 6, 96, 96)

    rows = [
        ("WavLM-Large, 2 s", 1, lambda: wavlm.extract_features(wav), lambda: fast_wavlm.extract_features(wav)),
        ("SynthesizerTrn, 2 s", 1, lambda: synth.infer(content, g=g, noise_scale=0.0),
         lambda: fast_synth.infer(content, g, noise_scale=0.0)),
        (f"Wav2Lip, per frame (batch {BATCH})", BATCH, lambda: w2l(mel, faces), lambda: fast_w2l(mel, faces)),
    ]
    print(f"\n{'network':<30} {'GFLOP':>7} {'seconds':>8} {'GFLOP/s':>8} {'of peak':>8} {'floor s':>8}", flush=True)
    floors = {}
    for name, per, eager, fast in rows:
        flops = counted_flops(eager) / per
        seconds = best_seconds(fast, args.repeats) / per
        floors[name] = flops / (peak * 1e9)
        print(f"{name:<30} {flops / 1e9:7.2f} {seconds:8.3f} {flops / seconds / 1e9:8.1f} "
              f"{flops / seconds / 1e9 / peak:7.0%} {floors[name]:8.3f}", flush=True)

    voice_floor = floors["WavLM-Large, 2 s"] + floors["SynthesizerTrn, 2 s"]
    lip_floor = floors[f"Wav2Lip, per frame (batch {BATCH})"]
    print(f"\nvoice conversion (2 s): floor {voice_floor:.3f} s at the sgemm peak; target {VOICE_TARGET_S:.3f} s "
          f"(2x the official {OFFICIAL_VOICE_2S:.2f} s): {'reachable' if voice_floor <= VOICE_TARGET_S else 'NOT reachable'} "
          "in fp32 on this CPU")
    print(f"lip sync: model floor {lip_floor:.4f} s per frame; target {LIPSYNC_TARGET_S_PER_FRAME} s per frame for the whole "
          f"stage: {'reachable' if lip_floor <= LIPSYNC_TARGET_S_PER_FRAME else 'NOT reachable'} by the model alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
