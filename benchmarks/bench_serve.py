"""The whole graph on a local Ray, through HTTP: per-stage times of a cold request (new video),
a warm one (same video, new sentence: face boxes and speaker embedding cached), and two
requests at once.

Uses serve_config.local.yaml (no GPU; synthetic weights when weights/ has no checkpoints, so
the timings are real and the outputs are not meaningful). The source is a 10 s 640x360 25 fps
astronaut clip, like the old server's test video.
Run: `python benchmarks/bench_serve.py [--seconds 10] [--port 8000]`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Good morning, this is a second sentence.",
             "A third line, said at the same time as", "a fourth one, to see two requests share the graph."]


def show(label: str, body: dict, wall: float) -> None:
    steps = body["step_times"]
    parts = "  ".join(f"{k}={v:.2f}" for k, v in steps.items())
    busy = sum(v for k, v in steps.items() if k != "total")
    print(f"{label:<22} wall {wall:6.2f}s | {parts} | sum of stages {busy:.2f}s "
          f"(overlap saved {busy - steps['total']:+.2f}s) | cache {body['cache']}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import httpx

    sys.path.insert(0, str(ROOT))  # devtools (the test clips) is not installed
    from devtools.local_graph import local_graph
    from devtools import testmedia
    from pipeline_graph import LOCAL_CONFIG, build_app

    data = Path(tempfile.mkdtemp(prefix="lipserve-bench-"))
    testmedia.write_demo_clip(data / "src.mp4", seconds=args.seconds)
    weights = ROOT / "weights"
    env = {"LIPSERVE_STORAGE_ROOT": str(data), "LIPSERVE_WEIGHTS_DIR": str(weights),
           "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper"}
    with local_graph(build_app(LOCAL_CONFIG, env=env), port=args.port) as graph:
        print(f"local Ray + deploy (models load in the replicas): {graph.deploy_s:.1f}s")
        url = f"{graph.url}/api/v1/lip-video"

        def post(i: int, text: str):
            body = {"word": text, "user_video_gs": "src.mp4", "output_video_gs": f"out/{i}.mp4", "tts_lang": "en"}
            start = time.perf_counter()
            r = httpx.post(url, json=body, timeout=600)
            r.raise_for_status()
            return r.json(), time.perf_counter() - start

        body, wall = post(0, SENTENCES[0])
        show("cold (new video)", body, wall)
        synthetic = body["synthetic_weights"]
        body, wall = post(1, SENTENCES[1])
        show("warm (same video)", body, wall)
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda a: post(*a), [(2, SENTENCES[2]), (3, SENTENCES[3])]))
        both = time.perf_counter() - start
        for n, (body, wall) in enumerate(results):
            show(f"concurrent #{n + 1}", body, wall)
        print(f"two concurrent requests done in {both:.2f}s")
        if synthetic:
            print("NOTE: synthetic weights (no checkpoints): timings are real, outputs are not meaningful")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
