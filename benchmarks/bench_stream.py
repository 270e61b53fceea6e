"""Streamed against whole answers, in one process: time to the first playable fragment, to the
last byte, and the whole answer's total, for 2 s and 10 s of speech, new and returning video.

The real architectures run on SYNTHETIC weights (the output is not meaningful; the work is the
real work), faces by the Haar cascade, speech from piper. Each case runs the whole answer and the
streamed one back to back on the same pipeline, so the ratios compare like with like. "new video"
clears the face cache first (detection runs), "returning" reuses it. Through Serve the same route
adds the object-store hop and the proxy (tests/test_serve.py checks it; not timed here).

Usage: .venv/bin/python benchmarks/bench_stream.py   (about 3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.contract import LipVideoRequest  # noqa: E402
from lipserve.pipeline import Pipeline  # noqa: E402
from lipserve.settings import Settings  # noqa: E402

SENTENCES = {2: "Hello there, this is me.",
             10: "Hello there, this is me talking for a good while now, so that the answer lasts about ten "
                 "seconds and we can see how early the first part of it starts to play."}


def run_case(pipeline: Pipeline, word: str, new_video: bool, tag: str) -> dict:
    if new_video:
        pipeline.stages.lipsync.clear_face_cache()
    whole = pipeline.run(LipVideoRequest(word=word, user_video_gs="src.mp4", output_video_gs=f"out/{tag}-w.mp4"))
    if new_video:
        pipeline.stages.lipsync.clear_face_cache()
    start, first = time.perf_counter(), []

    def on_piece(piece: bytes) -> None:
        if not first and b"moof" in piece:
            first.append(time.perf_counter() - start)

    streamed = pipeline.run(LipVideoRequest(word=word, user_video_gs="src.mp4", output_video_gs=f"out/{tag}-s.mp4"),
                            on_piece=on_piece)
    return {"speech_s": whole.duration_s, "whole_total": whole.step_times["total"],
            "first_fragment": first[0], "last_byte": streamed.step_times["total"]}


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    print("STREAMING BENCHMARK ON SYNTHETIC WEIGHTS: the output is NOT meaningful; the timings are the real work.")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "src.mp4").write_bytes(testmedia.astronaut_clip(seconds=12.0, fps=25, size=(640, 360),
                                                                audio="speechlike", motion="pan"))
        pipeline = Pipeline(Settings(storage_root=root, weights_dir=root / "no-weights", allow_synthetic_weights=True,
                                     tts_order=["piper"], device="cpu", warmup=True))
        rows = []
        for seconds, word in SENTENCES.items():
            for new_video in (True, False):
                tag = f"{seconds}-{'new' if new_video else 'back'}"
                rows.append((seconds, new_video, run_case(pipeline, word, new_video, tag)))
    print(f"{'speech':>8} {'video':>9} {'whole total':>12} {'first fragment':>15} {'ratio':>6} {'last byte':>10} "
          f"{'vs whole':>9}")
    for seconds, new_video, r in rows:
        print(f"{r['speech_s']:7.1f}s {'new' if new_video else 'returning':>9} {r['whole_total']:11.2f}s "
              f"{r['first_fragment']:14.2f}s {r['first_fragment'] / r['whole_total']:6.0%} {r['last_byte']:9.2f}s "
              f"{r['last_byte'] / r['whole_total'] - 1:+9.1%}")
    print("targets: first fragment <= 50 % of the whole total at 2 s of speech, <= 30 % at 10 s; "
          "last byte <= 5 % after the whole answer")


if __name__ == "__main__":
    main()
