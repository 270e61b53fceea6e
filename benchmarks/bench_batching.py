"""Cross-request batching on this machine: concurrent lip-sync requests on one LipSyncer, their
Wav2Lip frame batches merged into shared forwards or not, measured in the same process.

Why: the setting `cross_request_batching` is `auto` = on for CUDA and off on CPU; this is the
measurement behind the CPU half of that default (the GPU half is measured by benchmarks/gpu).
Rounds alternate off / on so that a noisy machine hurts both alike; the ratio is what counts.

Also printed: Wav2Lip alone per frame at the batch sizes a merge produces (16, 32, 64).

Input: the generated 10 s 640x360 clip of a real face (testmedia), 2 s of speech-like audio per
request (50 frames), faces cached. SYNTHETIC Wav2Lip weights (real architecture, output not
meaningful).

Usage: .venv/bin/python benchmarks/bench_batching.py [--requests 2 4] [--rounds 2]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools (the test clips) is not installed

from devtools import testmedia  # noqa: E402
from lipserve.lipsync import LipSyncer, LipSyncOptions  # noqa: E402
from lipserve.settings import Settings  # noqa: E402


def concurrent_round(syncer: LipSyncer, video: bytes, speech, n: int, merge: bool) -> dict:
    shared = syncer.wav2lip
    shared.merge = merge
    before = shared.stats.as_dict()
    options = LipSyncOptions(face_mode="static")
    threads = [threading.Thread(target=syncer.sync, args=(video, speech, 16000, options)) for _ in range(n)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t
    after = shared.stats.as_dict()
    forwards = after["forwards"] - before["forwards"]
    return {"wall": wall, "forwards": forwards, "frames_per_forward": (after["items"] - before["items"]) / max(1, forwards),
            "merged": after["merged_forwards"] - before["merged_forwards"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speech-s", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    settings = Settings(weights_dir=tempfile.mkdtemp(), allow_synthetic_weights=True, device="cpu",
                        cross_request_batching="on")
    syncer = LipSyncer(settings)
    print(f"SYNTHETIC Wav2Lip weights; torch threads {torch.get_num_threads()}; batching wait "
          f"{settings.lipsync.batching_wait_ms} ms; per-request batch {syncer.batch_size()}, merged forward up to "
          f"{syncer.wav2lip.max_items()} frames")
    video = testmedia.astronaut_clip(seconds=10.0, fps=25, size=(640, 360), audio=None)
    speech = testmedia.speechlike(args.speech_s, 16000)
    syncer.plan_faces(video, LipSyncOptions(face_mode="static"))
    frames = round(args.speech_s * 25)
    concurrent_round(syncer, video, speech, 1, False)  # warm-up: first-call costs out of the way

    print("\nWav2Lip alone, ms per frame")
    for batch in (16, 32, 64):
        x = (torch.rand(batch, 1, 80, 16) * 8 - 4, torch.rand(batch, 6, 96, 96))
        syncer._forward(*x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            syncer._forward(*x)
            times.append(time.perf_counter() - t)
        print(f"  batch {batch:3d}: {1000 * statistics.median(times) / batch:6.1f}")

    print(f"\n{'requests':>8} {'batching':>8} {'wall s':>8} {'frames/s':>9} {'forwards':>9} {'frames/fwd':>10} "
          f"{'merged':>7}")
    for n in args.requests:
        results = {False: [], True: []}
        for _ in range(args.rounds):
            for merge in (False, True):
                results[merge].append(concurrent_round(syncer, video, speech, n, merge))
        for merge in (False, True):
            rs = results[merge]
            wall = statistics.median(r["wall"] for r in rs)
            print(f"{n:>8} {'on' if merge else 'off':>8} {wall:8.2f} {n * frames / wall:9.1f} "
                  f"{statistics.mean(r['forwards'] for r in rs):9.1f} "
                  f"{statistics.mean(r['frames_per_forward'] for r in rs):10.1f} "
                  f"{statistics.mean(r['merged'] for r in rs):7.1f}")
        off = statistics.median(r["wall"] for r in results[False])
        on = statistics.median(r["wall"] for r in results[True])
        print(f"{'':>8} on / off wall: {on / off:.2f}")


if __name__ == "__main__":
    main()
