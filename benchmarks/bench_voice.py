"""Voice stage timings: model load, WavLM, speaker embedding (uncached / cached), synthesis.

Runs the real architectures (WavLM-Large, SynthesizerTrn, speaker encoder) on the deterministic
synthetic weights, so the figures are the compute cost of the real networks; the audio is not
meaningful. Prints one table; nothing is asserted.

    .venv/bin/python benchmarks/bench_voice.py                       # CPU, fp32, 2 s and 10 s
    .venv/bin/python benchmarks/bench_voice.py --from-files          # also time loading official-format files
    .venv/bin/python benchmarks/bench_voice.py --device cuda --precision fp16   # + the fp16 gap to fp32 (dBFS)
    .venv/bin/python benchmarks/bench_voice.py --seconds 2 --gap bf16 fp16      # gaps with CPU autocast (slow)

The precision gap is the one the stage checks at load: two seeded TTS sentences converted with
noise off, RMS (and peak) of the difference to fp32 in dBFS; the stage keeps reduced precision
only at or under AUTOCAST_MAX_GAP_DBFS (-60 dBFS).

For comparison, the official FreeVC code on this 2-core machine: WavLM-Large 0.68 s and
SynthesizerTrn 0.47 s for 2 s of audio (1.35 s and 1.13 s for 5 s), docs/FACTS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.settings import Settings  # noqa: E402
from lipserve.voice import VoiceConverter, prepare_reference  # noqa: E402


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def write_official_files(converter: VoiceConverter, weights_dir: Path) -> None:
    """The converter's (synthetic) weights as official-format files, to time a real load."""
    from lipserve.voice.loaders import SPEAKER_ENCODER_FILE, WAVLM_FILE
    from lipserve.weights.formats import write_checkpoint

    cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
    write_checkpoint(weights_dir / WAVLM_FILE, "wavlm", cpu(converter.wavlm), cfg=converter.wavlm.cfg.to_dict())
    write_checkpoint(weights_dir / f"{converter.variant}.pth", "freevc", cpu(converter.synthesizer))
    if converter.speaker_encoder is not None:
        write_checkpoint(weights_dir / SPEAKER_ENCODER_FILE, "speaker_encoder", cpu(converter.speaker_encoder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="freevc", choices=["freevc", "freevc-s", "freevc-24"])
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0], help="speech lengths")
    ap.add_argument("--reference-seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="best of N per step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--from-files", action="store_true", help="also time loading official-format files (writes ~1.4 GB to a temp dir)")
    ap.add_argument("--gap", nargs="*", default=[], choices=["fp16", "bf16"],
                    help="also measure these autocast dtypes against fp32 on this device (on a CPU: CPU autocast)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    empty = Path(tempfile.gettempdir()) / "bench_voice_no_weights"  # stays empty: every network synthetic
    settings = Settings(weights_dir=empty, allow_synthetic_weights=True, freevc_variant=args.variant,
                        device=args.device, precision=args.precision)
    start = time.perf_counter()
    vc = VoiceConverter(settings)
    load_synthetic = time.perf_counter() - start
    rows = [("model load, synthetic weights (generated)", load_synthetic)]

    if args.from_files:
        with tempfile.TemporaryDirectory(prefix="bench_voice_files_") as files:
            write_official_files(vc, Path(files))
            start = time.perf_counter()
            VoiceConverter(settings.replace(**{"weights_dir": Path(files), "allow_synthetic_weights": False}))
            rows.append(("model load, official-format files (in page cache)", time.perf_counter() - start))

    reference = prepare_reference(testmedia.speechlike(args.reference_seconds, 16000, seed=12), "benchmark")
    vc.convert(testmedia.speechlike(1.0, 16000, seed=1), 16000, reference)  # warm-up (allocator, librosa caches)

    def uncached_speaker():
        vc.speaker_cache = type(vc.speaker_cache)(vc.speaker_cache.maxsize)
        return vc.speaker_vector(reference)

    t_uncached, (speaker, _) = best_of(uncached_speaker, args.repeat)
    t_cached, (_, hit) = best_of(lambda: vc.speaker_vector(reference), args.repeat)
    assert hit, "second lookup should hit the speaker cache"
    rows.append((f"speaker embedding, uncached ({args.reference_seconds:g} s reference)", t_uncached))
    rows.append(("speaker embedding, cached", t_cached))

    for seconds in args.seconds:
        speech = testmedia.speechlike(seconds, 16000, seed=5)
        t_wavlm, content = best_of(lambda: vc.content(speech), args.repeat)
        t_synth, _ = best_of(lambda: vc.synthesize(content, speaker), args.repeat)
        t_total, _ = best_of(lambda: vc.convert(speech, 16000, reference), args.repeat)
        rows += [(f"WavLM, {seconds:g} s speech", t_wavlm), (f"synthesis, {seconds:g} s speech", t_synth),
                 (f"convert() total, {seconds:g} s speech (speaker cached)", t_total)]

    from lipserve.voice.converter import AUTOCAST_MAX_GAP_DBFS, probe_speech

    gaps = {}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    wanted = [vc.autocast] if vc.autocast is not None else []
    wanted += [dtypes[name] for name in args.gap if dtypes[name] not in wanted]
    if wanted:
        probe = probe_speech()
        saved = vc.autocast
        for dtype in wanted:
            vc.autocast = dtype
            start = time.perf_counter()
            gaps[str(dtype).replace("torch.", "")] = (vc.autocast_gap(probe), time.perf_counter() - start)
        vc.autocast = saved

    print(f"voice benchmark: {args.variant} on {vc.device} ({vc.describe()['precision']}), torch threads "
          f"{torch.get_num_threads()}, best of {args.repeat}, synthetic weights")
    for name, sec in rows:
        print(f"  {name:<52}{sec:8.3f} s")
    for name, (gap, seconds) in gaps.items():
        verdict = "kept" if gap.within(AUTOCAST_MAX_GAP_DBFS) else "falls back to fp32"
        print(f"  {name} - fp32 on {gap.probe} ({probe[0].size / 16000:.2f} s, noise off): "
              f"{gap.rms_dbfs:.1f} dBFS RMS, peak {gap.peak_dbfs:.1f} dBFS -> {verdict} "
              f"(tolerance {AUTOCAST_MAX_GAP_DBFS:g}); measured in {seconds:.1f} s")
    print("  (official FreeVC here: WavLM-Large 0.68 s, synthesis 0.47 s for 2 s of audio)")


if __name__ == "__main__":
    main()
