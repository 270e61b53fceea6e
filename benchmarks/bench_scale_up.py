"""Scale-up under load: does a replica the autoscaler adds serve as fast as the ones already there?

    .venv/bin/python benchmarks/bench_scale_up.py [--clients 3] [--seconds 240] [--no-warmup]

Deploys serve_config.local.yaml with one replica per stage and autoscaling on the voice and
lip-sync stages (target 1 ongoing request, up to 2 replicas, a 2 s upscale delay, no downscale
during the run), then keeps `--clients` requests in flight for `--seconds`. The stages' own
latency metric (ray_lipserve_stage_latency_seconds, tagged by Serve with the replica id) is
scraped every second from Ray's Prometheus export, so each replica's requests are told apart:
for every replica it prints when it served its first request, the latency of its first scraped
requests and its mean, and the stage's replicas present at the start ("old") against those the
autoscaler added ("new"). Caches are off (LIPSERVE_*_CACHE_SIZE=0): every request does the same
work on whichever replica, so a difference is the new replica's cold start.

Synthetic weights: the timings are real, the outputs are NOT meaningful. On this 2-core machine
the added replicas share the same two cores, so throughput does not grow; the point is the
latency a new replica gives its first callers. Figures only, nothing asserted.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello! This video was made by lipserve."
SCALED = ("VoiceConverter", "LipSyncer")
STAGE_OF = {"voice": "VoiceConverter", "lipsync": "LipSyncer", "faces": "LipSyncer", "tts": "SpeechSynthesizer"}
SAMPLE = re.compile(r'^ray_lipserve_stage_latency_seconds_(sum|count)\{([^}]*)\}\s+([0-9.eE+-]+)', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(url: str, httpx) -> dict[tuple[str, str], tuple[float, float]]:
    """(stage, replica) -> (count, sum) from one scrape of the Prometheus export."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for kind, labels, value in SAMPLE.findall(httpx.get(url, timeout=10).text):
        tags = dict(LABEL.findall(labels))
        key = (tags.get("stage", "?"), tags.get("replica", "?"))
        out[key][0 if kind == "count" else 1] += float(value)
    return {k: (c, s) for k, (c, s) in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=3, help="requests kept in flight")
    parser.add_argument("--seconds", type=float, default=240.0, help="how long the load lasts")
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--no-warmup", action="store_true", help="LIPSERVE_WARMUP=0: replicas start unwarmed")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

    import httpx
    from ray import serve

    from devtools.local_graph import local_graph
    from devtools import testmedia
    from pipeline_graph import LOCAL_CONFIG, build_app

    data = Path(tempfile.mkdtemp(prefix="lipserve-scale-"))
    weights = data / "no-weights"
    weights.mkdir()
    testmedia.write_demo_clip(data / "src.mp4", seconds=4.0)
    env = {"LIPSERVE_STORAGE_ROOT": str(data), "LIPSERVE_WEIGHTS_DIR": str(weights),
           "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper", "LIPSERVE_TTS_CACHE_SIZE": "0",
           "LIPSERVE_SPEAKER_CACHE_SIZE": "0", "LIPSERVE_FACE_CACHE_SIZE": "0", "LIPSERVE_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    if args.no_warmup:
        env["LIPSERVE_WARMUP"] = "0"
    autoscale = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": args.max_replicas,
                 "target_ongoing_requests": 1, "upscale_delay_s": 2, "downscale_delay_s": 3600,
                 "metrics_interval_s": 1, "look_back_period_s": 4}
    overrides = {
        # logical CPUs small enough that the added replicas fit on a 2-core box
        "Ingress": {"user_config": {"log_level": "INFO", "max_active": 2 * args.clients, "max_waiting": 4 * args.clients},
                    "max_ongoing_requests": 4 * args.clients, "max_queued_requests": 4 * args.clients},
        "SpeechSynthesizer": {"ray_actor_options": {"num_cpus": 0.1}},
        "VoiceConverter": {"autoscaling_config": autoscale, "num_replicas": "auto", "max_ongoing_requests": 2,
                           "ray_actor_options": {"num_cpus": 0.2}},
        "LipSyncer": {"autoscaling_config": autoscale, "num_replicas": "auto", "max_ongoing_requests": 2,
                      "ray_actor_options": {"num_cpus": 0.2}},
    }
    stop = threading.Event()
    series: list[tuple[float, dict]] = []  # (seconds since load start, scrape)
    results: list[dict] = []
    replica_states: dict[str, list[tuple[float, dict]]] = {}  # deployment -> [(seconds, {state: count})] on change
    app = build_app(LOCAL_CONFIG, overrides=overrides, env=env)
    with local_graph(app, port=args.port, request_timeout_s=900) as graph:
        metrics_url = graph.cluster.metrics_url
        print(f"local Ray up and deployed in {graph.deploy_s:.1f}s with one replica per stage "
              f"(warm-up {'off' if args.no_warmup else 'on'})", flush=True)
        url = f"{graph.url}/api/v1/lip-video"
        with httpx.Client(timeout=900) as client:  # one request first: the "old" replicas have served
            r = client.post(url, json={"word": TEXT, "user_video_gs": "src.mp4", "output_video_gs": "out/first.mp4",
                                       "tts_lang": "en", "options": {"overwrite": True, "face_mode": "track"}})
            r.raise_for_status()
        time.sleep(2.5)  # let the metrics export catch up
        old = {key for key in scrape(metrics_url, httpx)}
        print(f"replicas before the load: {sorted(old)}", flush=True)
        t0 = time.perf_counter()

        def poll():
            while not stop.is_set():
                try:
                    series.append((time.perf_counter() - t0, scrape(metrics_url, httpx)))
                except httpx.HTTPError as exc:
                    print(f"metrics scrape failed: {exc}", flush=True)
                deployments = serve.status().applications["lipserve"].deployments
                for name in SCALED:
                    states = {str(k).split(".")[-1]: v for k, v in deployments[name].replica_states.items()}
                    if states != replica_states.get(name, [(None, None)])[-1][1]:
                        replica_states.setdefault(name, []).append((time.perf_counter() - t0, states))
                stop.wait(1.0)

        def client_loop(n: int):
            i = 0
            with httpx.Client(timeout=900) as client:
                while time.perf_counter() - t0 < args.seconds:
                    body = {"word": TEXT, "user_video_gs": "src.mp4", "output_video_gs": f"out/{n}-{i}.mp4",
                            "tts_lang": "en", "options": {"overwrite": True, "face_mode": "track"}}
                    start = time.perf_counter() - t0
                    r = client.post(url, json=body)
                    end = time.perf_counter() - t0
                    results.append({"client": n, "start": start, "end": end, "status": r.status_code,
                                    "steps": r.json().get("step_times", {}) if r.status_code == 200 else {}})
                    i += 1

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        clients = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        time.sleep(2.5)
        series.append((time.perf_counter() - t0, scrape(metrics_url, httpx)))
        stop.set()
        poller.join()
        status = serve.status().applications["lipserve"].deployments
        running = {name: dict(d.replica_states) for name, d in status.items()}
        stop.set()

    print("\nreplica states of the scaled deployments over the load (seconds since it began):")
    for name, changes in replica_states.items():
        print(f"  {name}: " + "; ".join(f"{t:.0f}s {states}" for t, states in changes))
    ok = [r for r in results if r["status"] == 200]
    print(f"\n{len(results)} requests in {args.seconds:.0f}s from {args.clients} clients, {len(ok)} answered 200 "
          f"(others: {sorted({r['status'] for r in results if r['status'] != 200})}); replicas at the end: {running}")
    if ok:
        totals = [r["steps"]["total"] for r in ok]
        print(f"request total: median {statistics.median(totals):.2f}s, max {max(totals):.2f}s")

    # per replica: the first scrape in which it had served requests, and its deltas from then on
    last = series[-1][1] if series else {}
    print(f"\n{'stage':<8} {'replica':<12} {'old/new':<7} {'first seen':>10} {'first n':>7} {'first mean':>10} "
          f"{'all n':>6} {'all mean':>9}")
    summary: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key in sorted(last):
        stage, replica = key
        if STAGE_OF.get(stage) not in SCALED:
            continue
        base = (0.0, 0.0)
        first = None
        for seconds, scraped in series:
            count, total = scraped.get(key, (0.0, 0.0))
            if key in old and first is None:
                base, first = (count, total), (seconds, 0.0, 0.0)
                continue
            if first is None and count > 0:
                first = (seconds, count, total / count)
        count, total = last[key]
        n_all, sum_all = count - base[0], total - base[1]
        kind = "old" if key in old else "new"
        if n_all <= 0:
            continue
        mean_all = sum_all / n_all
        summary[(stage, kind)].append(mean_all)
        first_txt = (f"{first[0]:9.0f}s {first[1]:7.0f} {first[2]:9.2f}s" if kind == "new" and first
                     else f"{'-':>10} {'-':>7} {'-':>10}")
        print(f"{stage:<8} {replica[:12]:<12} {kind:<7} {first_txt} {n_all:6.0f} {mean_all:8.2f}s")
    print("\nmean stage latency during the load, old replicas against new ones:")
    for stage in ("faces", "voice", "lipsync"):
        o, n = summary.get((stage, "old")), summary.get((stage, "new"))
        if o and n:
            print(f"  {stage:<8} old {statistics.mean(o):6.2f}s   new {statistics.mean(n):6.2f}s   "
                  f"new/old {statistics.mean(n) / statistics.mean(o):5.2f}x")
        elif o:
            print(f"  {stage:<8} old {statistics.mean(o):6.2f}s   (no new replica served it)")
    print("\nNOTE: synthetic weights (no checkpoints): timings are real, outputs are NOT meaningful; "
          "a shared 2-core machine: the new replicas compete with the old ones for the same cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
