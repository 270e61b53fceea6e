"""Memory under a long mixed run: 200 requests over 50 different source videos and 100 different
texts, against the local graph (as benchmarks/load.py starts it) with caches smaller than that
variety, so they fill and evict.

Reported after the warm-up and after every 50 requests: each replica's RSS, and each cache's size
against its configured maximum (face boxes and probes per video in LipSyncer, speaker embeddings
in VoiceConverter, utterances in SpeechSynthesizer). Then the RSS growth per 100 requests once
the caches are full (requests 100 -> 200), against the bound stated by --max-growth-mib.

Run it under the machine's heavy-job lock:
    flock /tmp/lipserve-heavy.lock .venv/bin/python benchmarks/memory.py [--requests 200]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import STAGES, Graph, post, rss_kib  # noqa: E402

CACHES = {"LipSyncer": ("face_cache", "LIPSERVE_FACE_CACHE_SIZE"),
          "VoiceConverter": ("speaker_cache", "LIPSERVE_SPEAKER_CACHE_SIZE"),
          "SpeechSynthesizer": ("cache", "LIPSERVE_TTS_CACHE_SIZE")}


def cache_stats(graph: Graph) -> dict[str, dict]:
    return {name: graph.state(name)[key] for name, (key, _) in CACHES.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--face-cache", type=int, default=16)
    parser.add_argument("--speaker-cache", type=int, default=16)
    parser.add_argument("--tts-cache", type=int, default=32)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--max-growth-mib", type=float, default=64.0,
                        help="bound on any replica's RSS growth from request 100 to 200 (caches full)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools (the test clips) is not installed
    from devtools import testmedia

    sizes = {"LipSyncer": args.face_cache, "VoiceConverter": args.speaker_cache, "SpeechSynthesizer": args.tts_cache}
    env = {CACHES[name][1]: str(size) for name, size in sizes.items()}
    with Graph(args.port, request_timeout_s=300, extra_env=env) as graph:
        t = time.perf_counter()
        for v in range(args.videos):
            # every clip differs in its bytes (length), so each is a new entry in the caches
            testmedia.write_demo_clip(graph.data / f"src/{v}.mp4", seconds=1.0 + 0.02 * v, size=(240, 180))
        print(f"{args.videos} source clips written in {time.perf_counter() - t:.1f} s", flush=True)
        texts = [f"Sentence {i}: the caches stay within bounds." if i % 2 else f"Line {i}, short." for i in range(args.texts)]

        def body(j: int) -> dict:
            return {"word": texts[j % args.texts], "user_video_gs": f"src/{j % args.videos}.mp4",
                    "output_video_gs": f"out/{j}.mp4", "tts_lang": "en", "options": {"overwrite": True}}

        pids = graph.pids()
        with httpx.Client(timeout=400) as client:
            warm = post(client, graph.url, {**body(0), "output_video_gs": "out/warm.mp4"})
            assert warm.status == 200, warm
            checkpoints = {0: ({n: rss_kib(p)["VmRSS"] for n, p in pids.items()}, cache_stats(graph))}
            failures, t = [], time.perf_counter()
            with cf.ThreadPoolExecutor(args.clients) as pool:
                for start in range(0, args.requests, 50):
                    outcomes = list(pool.map(lambda j: post(client, graph.url, body(j)),
                                             range(start, min(start + 50, args.requests))))
                    failures += [o for o in outcomes if o.status != 200]
                    done = min(start + 50, args.requests)
                    checkpoints[done] = ({n: rss_kib(p)["VmRSS"] for n, p in pids.items()}, cache_stats(graph))
                    rss, caches = checkpoints[done]
                    print(f"after {done:>3} requests ({time.perf_counter() - t:6.0f} s): RSS " + ", ".join(
                        f"{n} {kib / 1024:.0f} MiB" for n, kib in rss.items()) + " | caches " + ", ".join(
                        f"{n} {c['size']}/{c['maxsize']}" for n, c in caches.items()), flush=True)
        same = graph.pids() == pids

    print("\n== summary (a shared 2-core machine) ==")
    print(f"{args.requests} requests, {args.videos} videos, {args.texts} texts, {args.clients} clients; "
          f"failed: {len(failures)} {sorted({(o.status, o.code) for o in failures})}; replicas restarted: "
          f"{'no' if same else 'YES'}")
    within = all(c["size"] <= sizes[n] for _, caches in checkpoints.values() for n, c in caches.items())
    full = all(c["size"] == sizes[n] for n, c in checkpoints[max(checkpoints)][1].items())
    print(f"caches within their configured sizes at every checkpoint: {'yes' if within else 'NO'}; "
          f"full at the end: {'yes' if full else 'no'}")
    mid = min((k for k in checkpoints if k >= args.requests // 2), default=0)
    end = max(checkpoints)
    growth = {}
    for name in STAGES:
        first, middle, last = (checkpoints[k][0][name] / 1024 for k in (0, mid, end))
        growth[name] = (last - middle) * 100 / max(1, end - mid)
        print(f"{name:<18} RSS {first:7.0f} MiB after warm-up, {middle:7.0f} after {mid}, {last:7.0f} after {end}: "
              f"{(middle - first) * 100 / max(1, mid):+6.1f} MiB per 100 requests while the caches fill, "
              f"{growth[name]:+6.1f} MiB per 100 once they are full")
    bounded = all(g <= args.max_growth_mib for g in growth.values())
    print(f"growth per 100 requests with full caches within {args.max_growth_mib:g} MiB for every replica: "
          f"{'yes' if bounded else 'NO'}")
    return 0 if (within and bounded and not failures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
