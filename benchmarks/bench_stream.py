"""Streamed against whole answers, in one process: time to the first playable fragment, to the
last byte, and the whole answer's total, for 2 s and 10 s of speech, new and returning video.

The real architectures run on SYNTHETIC weights (the output is not meaningful; the work is the
real work), faces by the Haar cascade, speech from piper. Each case runs the whole answer and the
streamed one back to back on the same pipeline, so the ratios compare like with like: each speaks a
text no earlier answer did, "new video" is a copy of the clip never seen before (no face, speaker or
reference cache), "returning" the clip every cache knows. One untimed request of each kind runs first,
and before each case an untimed pair of the same shape (other names), so the voice graphs know the
length (a server that has run a while has met every rung of their length ladder).

With --serve the same cases run through the graph on a local Ray (serve_config.local.yaml) over
HTTP: POST /api/v1/lip-video against POST /api/v1/lip-video/stream, timed at the caller (the first
chunk that holds a `moof`, the last byte).

Usage: .venv/bin/python benchmarks/bench_stream.py [--serve]   (5 / 8 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.contract import LipVideoRequest  # noqa: E402
from lipserve.pipeline import Pipeline  # noqa: E402
from lipserve.settings import Settings  # noqa: E402

# every answer speaks a text no earlier one did (the TTS cache never answers): a name per run
SENTENCES = {2: "Hello {name}, this is me.",
             10: "Hello {name}, this is me talking for a good while now, so that the answer lasts about ten "
                 "seconds and we can see how early the first part of it starts to play."}
NAMES = iter(["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Greta", "Hugo", "Ilsa", "Jonas", "Karla", "Luca",
              "Marta", "Nico", "Olga", "Piet", "Rosa", "Sven", "Tina", "Udo"])


def texts(seconds: int) -> tuple[str, str]:
    """The whole answer's text and the streamed one's, of the same shape."""
    return SENTENCES[seconds].format(name=next(NAMES)), SENTENCES[seconds].format(name=next(NAMES))


def run_case(pipeline: Pipeline, words: tuple[str, str], sources: tuple[str, str], tag: str) -> dict:
    """The whole answer from sources[0], then the streamed one from sources[1] (the same clip, or
    a second never-seen copy for a new video: no face, speaker or reference cache answers)."""
    whole = pipeline.run(LipVideoRequest(word=words[0], user_video_gs=sources[0], output_video_gs=f"out/{tag}-w.mp4"))
    start, first = time.perf_counter(), []

    def on_piece(piece: bytes) -> None:
        if not first and b"moof" in piece:
            first.append(time.perf_counter() - start)

    streamed = pipeline.run(LipVideoRequest(word=words[1], user_video_gs=sources[1],
                                            output_video_gs=f"out/{tag}-s.mp4"), on_piece=on_piece)
    steps = whole.step_times
    return {"speech_s": whole.duration_s, "whole_total": steps["total"],
            "first_fragment": first[0], "last_byte": streamed.step_times["total"],
            "before_lipsync": max(steps.get("tts", 0) + steps.get("voice", 0), steps.get("faces", 0))}


def serve_case(url: str, words: tuple[str, str], sources: tuple[str, str], tag: str) -> dict:
    """The whole answer from sources[0], then the streamed one from sources[1] (the same clip, or
    a second never-seen copy for a new video), through HTTP."""
    import httpx

    def body(word: str, src: str, out: str) -> dict:
        return {"word": word, "user_video_gs": src, "output_video_gs": out, "tts_lang": "en"}

    start = time.perf_counter()
    r = httpx.post(url + "/api/v1/lip-video", json=body(words[0], sources[0], f"out/{tag}-w.mp4"), timeout=600)
    r.raise_for_status()
    whole_total, answer = time.perf_counter() - start, r.json()
    first = None
    start = time.perf_counter()
    with httpx.stream("POST", url + "/api/v1/lip-video/stream", json=body(words[1], sources[1], f"out/{tag}-s.mp4"),
                      timeout=600) as streamed:
        streamed.raise_for_status()
        for chunk in streamed.iter_raw():
            if first is None and b"moof" in chunk:
                first = time.perf_counter() - start
    steps = answer["step_times"]
    return {"speech_s": answer["duration_s"], "whole_total": whole_total, "first_fragment": first,
            "last_byte": time.perf_counter() - start,
            "before_lipsync": max(steps.get("tts", 0) + steps.get("voice", 0), steps.get("faces", 0))}


def print_rows(rows) -> None:
    print(f"{'speech':>8} {'video':>9} {'whole total':>12} {'first fragment':>15} {'ratio':>6} {'last byte':>10} "
          f"{'vs whole':>9}")
    for seconds, new_video, r in rows:
        print(f"{r['speech_s']:7.1f}s {'new' if new_video else 'returning':>9} {r['whole_total']:11.2f}s "
              f"{r['first_fragment']:14.2f}s {r['first_fragment'] / r['whole_total']:6.0%} {r['last_byte']:9.2f}s "
              f"{r['last_byte'] / r['whole_total'] - 1:+9.1%}"
              + (f"   (TTS + voice before lip sync: {r['before_lipsync']:.2f}s)" if "before_lipsync" in r else ""))
    print("targets: first fragment <= 50 % of the whole total at 2 s of speech, <= 30 % at 10 s; "
          "last byte <= 5 % after the whole answer")


def write_sources(root: Path) -> None:
    """src.mp4, and never-seen copies of it for the new-video cases (other bytes, the same shape)."""
    for name, seconds in (("src.mp4", 12.0), ("new-a.mp4", 11.96), ("new-b.mp4", 11.92), ("new-c.mp4", 11.88),
                          ("new-d.mp4", 11.84)):
        (root / name).write_bytes(testmedia.astronaut_clip(seconds=seconds, fps=25, size=(640, 360),
                                                           audio="speechlike", motion="pan"))


def cases():
    """(seconds of speech, new video?, the two texts, the two sources) in the order they run."""
    unseen = iter(["new-a.mp4", "new-b.mp4", "new-c.mp4", "new-d.mp4"])
    for seconds in SENTENCES:
        for new_video in (True, False):
            sources = (next(unseen), next(unseen)) if new_video else ("src.mp4", "src.mp4")
            yield seconds, new_video, texts(seconds), sources


def main_in_process(root: Path) -> list:
    pipeline = Pipeline(Settings(storage_root=root, weights_dir=root / "no-weights", allow_synthetic_weights=True,
                                 tts_order=["piper"], device="cpu", warmup=True))
    first = ("A first request, so that nothing below is the first.",) * 2
    run_case(pipeline, first, ("src.mp4", "src.mp4"), "first")
    rows = []
    for seconds, new_video, words, sources in cases():
        tag = f"{seconds}-{'new' if new_video else 'back'}"
        run_case(pipeline, texts(seconds), ("src.mp4", "src.mp4"), tag + "-warm")
        rows.append((seconds, new_video, run_case(pipeline, words, sources, tag)))
    return rows


def main_through_serve(root: Path) -> list:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from devtools.local_graph import local_graph
    from pipeline_graph import LOCAL_CONFIG, build_app

    env = {"LIPSERVE_STORAGE_ROOT": str(root), "LIPSERVE_WEIGHTS_DIR": str(root / "no-weights"),
           "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper"}
    rows = []
    with local_graph(build_app(LOCAL_CONFIG, env=env), port=8000) as graph:
        print(f"local Ray + deploy: {graph.deploy_s:.1f}s")
        serve_case(graph.url, ("A first request, so that nothing below is the first.",) * 2, ("src.mp4", "src.mp4"),
                   "first")
        for seconds, new_video, words, sources in cases():
            tag = f"{seconds}-{'new' if new_video else 'back'}"
            serve_case(graph.url, texts(seconds), ("src.mp4", "src.mp4"), tag + "-warm")
            rows.append((seconds, new_video, serve_case(graph.url, words, sources, tag)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="through the Serve graph over HTTP")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print("STREAMING BENCHMARK ON SYNTHETIC WEIGHTS: the output is NOT meaningful; the timings are the real work.")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_sources(root)
        rows = main_through_serve(root) if args.serve else main_in_process(root)
    print_rows(rows)


if __name__ == "__main__":
    main()
