"""Media I/O on this machine: partial decode (frames decoded for N asked), full decode, audio
extraction, and H.264 + AAC encoding speed, on generated astronaut clips.

Run with `python benchmarks/bench_media.py [--seconds 30] [--repeats 3]`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools (the test clips) is not installed

from devtools import testmedia  # noqa: E402
from lipserve import media  # noqa: E402


def best_of(fn, repeats: int):
    """(smallest wall time, last result) over `repeats` calls: least disturbed by other load."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the long source clip")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    for size in ((640, 360), (1280, 720)):
        start = time.perf_counter()
        clip = testmedia.astronaut_clip(seconds=args.seconds, size=size)
        made = time.perf_counter() - start
        info = media.probe(clip)
        print(f"\nsource {size[0]}x{size[1]} {info.fps:g} fps, {info.n_frames} frames, "
              f"{len(clip) / 1e6:.1f} MB (generated in {made:.1f} s)")

        probe_s, _ = best_of(lambda: media.probe(clip), args.repeats)
        print(f"  probe                         {probe_s * 1000:7.1f} ms")
        for wanted in (1, 25, 50, 100):
            stats = {}
            seconds, frames = best_of(lambda: media.decode_frames(clip, wanted, stats=stats), args.repeats)
            print(f"  decode first {wanted:4d} frames      {seconds:7.3f} s   decoded {stats['decoded']:4d}"
                  f"  packets {stats['packets']:4d}  of {info.n_frames}")
        stats = {}
        seconds, frames = best_of(lambda: media.decode_frames(clip, 25, start=info.n_frames - 25, stats=stats), 1)
        print(f"  decode last 25 frames         {seconds:7.3f} s   decoded {stats['decoded']:4d} (seek to keyframe)")
        stats = {}
        seconds, frames = best_of(lambda: media.decode_frames(clip, stats=stats), 1)
        print(f"  decode all                    {seconds:7.3f} s   {len(frames) / seconds:6.1f} frames/s")
        audio_s, audio = best_of(lambda: media.read_audio(clip, 16000), args.repeats)
        print(f"  read audio -> 16 kHz mono     {audio_s * 1000:7.1f} ms  ({len(audio) / 16000:.1f} s of audio)")

        n = min(len(frames), 250)  # a 10 s output, the usual answer length
        speech = testmedia.speechlike(n / info.fps, sample_rate=16000)
        seconds, mp4 = best_of(lambda: media.encode_mp4(frames[:n], info.fps, speech, 16000), args.repeats)
        out = media.probe(mp4)
        print(f"  encode {n} frames + AAC        {seconds:7.3f} s   {n / seconds:6.1f} frames/s, "
              f"{len(mp4) / 1e6:.2f} MB, duration {out.duration:.3f} s (audio {len(speech) / 16000:.3f} s)")


if __name__ == "__main__":
    np.random.seed(0)
    main()
