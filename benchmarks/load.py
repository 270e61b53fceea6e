"""Load against the local graph: N clients for M seconds at 1x, 2x and 4x the rate it sustains.

Starts a private local Ray and deploys (devtools.local_graph) serve_config.local.yaml (one replica
each, synthetic weights when weights/ holds no checkpoints, so timings are real and outputs are
not meaningful) with local storage in a temp folder, and talks to it over HTTP on 127.0.0.1 only.

1. Calibration: `--calibrate` requests, `max_active` clients back to back (what the admission gate
   lets run at once): the sustainable rate is what they complete per second.
2. For each multiple k in `--rates`: requests arrive every 1/(k * rate) s for `--seconds` s, sent by
   at most `--clients` clients (an arrival waits for a free client). Per run: counts of 200 / 503 /
   other, p50 / p95 / p99 and max latency of the 200s, the most requests the ingress held at once
   (running + waiting in its gate) and each stage's most calls in flight (sampled every 0.5 s),
   each replica's peak RSS (the kernel's high-water mark, VmHWM), whether any request waited
   past request_timeout_s, and one request afterwards (the graph serves normally).

Run it under the machine's heavy-job lock:
    flock /tmp/lipserve-heavy.lock .venv/bin/python benchmarks/load.py [--seconds 120] [--clients 12]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "lipserve"
STAGES = ("Ingress", "SpeechSynthesizer", "VoiceConverter", "LipSyncer")
WORDS = ["Hello there, this is a load test.", "Good morning to everyone listening.", "The graph keeps serving.",
         "One more sentence for the queue.", "Requests arrive faster than they leave.", "Numbers, then a pause."]


# ------------------------------------------------------------------ the graph


class Graph:
    """A local Ray with the graph deployed from serve_config.local.yaml; local storage in `data`."""

    def __init__(self, port: int, request_timeout_s: float, extra_env: dict | None = None,
                 user_config: dict | None = None):
        self.port, self.request_timeout_s = port, request_timeout_s
        self.extra_env, self.user_config = extra_env or {}, user_config or {}
        self.data = Path(tempfile.mkdtemp(prefix="lipserve-load-"))
        self.graph = None  # the running local_graph's context manager

    def __enter__(self) -> "Graph":
        from devtools.local_graph import local_graph
        from pipeline_graph import LOCAL_CONFIG, build_app

        env = {"LIPSERVE_STORAGE_ROOT": str(self.data), "LIPSERVE_WEIGHTS_DIR": str(ROOT / "weights"),
               "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper",
               "LIPSERVE_REQUEST_TIMEOUT_S": str(self.request_timeout_s), **self.extra_env}
        overrides = {name: {"user_config": config} for name, config in self.user_config.items()}
        self.graph = local_graph(build_app(LOCAL_CONFIG, overrides=overrides, env=env), port=self.port,
                                 request_timeout_s=self.request_timeout_s + 30, name=APP)
        running = self.graph.__enter__()
        print(f"local Ray + graph up in {running.deploy_s:.1f} s (Ray {running.cluster.start_s:.1f} s)", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.graph.__exit__(*exc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/lip-video"

    def state(self, name: str) -> dict:
        from ray import serve

        handle = serve.get_deployment_handle(name, app_name=APP)
        call = handle.load if name == "Ingress" else handle.describe
        return call.remote().result(timeout_s=60)

    def pids(self) -> dict[str, int]:
        return {name: self.state(name)["replica_pid"] for name in STAGES}


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------ requests


@dataclass
class Outcome:
    status: int
    seconds: float
    code: str = ""


def post(client, url: str, body: dict) -> Outcome:
    import httpx

    t = time.perf_counter()
    try:
        r = client.post(url, json=body)
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - t, type(exc).__name__)
    code = ""
    if r.status_code != 200:
        try:
            code = r.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = r.text[:40]
    return Outcome(r.status_code, time.perf_counter() - t, code)


@dataclass
class Sampler:
    """Polls the ingress and the stages every `every` seconds while a run lasts."""

    graph: Graph
    every: float = 0.5
    most_held: int = 0           # ingress: running + waiting in its gate
    most_waiting: int = 0
    most_in_flight: dict = field(default_factory=dict)  # stage -> most calls at once
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ingress = self.graph.state("Ingress")
                self.most_held = max(self.most_held, ingress["running"] + ingress["waiting"])
                self.most_waiting = max(self.most_waiting, ingress["waiting"])
                for name in STAGES[1:]:
                    busy = sum(self.graph.state(name)["in_flight"].values())
                    self.most_in_flight[name] = max(self.most_in_flight.get(name, 0), busy)
            except Exception as exc:  # a sample missed is reported, the run goes on
                print(f"  (sampler: {type(exc).__name__}: {exc})", flush=True)
            self._stop.wait(self.every)


def make_body(i: int, source: str, word: str | None = None) -> dict:
    return {"word": word or f"{WORDS[i % len(WORDS)]} Number {i}.", "user_video_gs": source,
            "output_video_gs": f"out/{i}.mp4", "tts_lang": "en", "options": {"overwrite": True}}


def calibrate(graph: Graph, source: str, clients: int, count: int) -> float:
    """Requests per second that `clients` back-to-back clients complete (one warm-up first)."""
    import httpx

    with httpx.Client(timeout=graph.request_timeout_s + 60) as client:
        warm = post(client, graph.url, make_body(10_000, source))
        assert warm.status == 200, f"warm-up failed: {warm}"
        counter = iter(range(10_001, 10_001 + count))
        lock = threading.Lock()
        done: list[Outcome] = []

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                done.append(post(client, graph.url, make_body(i, source)))

        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    ok = [o for o in done if o.status == 200]
    rate = len(ok) / wall
    print(f"calibration: {len(ok)}/{len(done)} ok with {clients} clients in {wall:.1f} s -> sustainable "
          f"{rate:.3f} req/s (mean latency {statistics.mean(o.seconds for o in ok):.1f} s)", flush=True)
    return rate


def run_at(graph: Graph, source: str, rate: float, seconds: float, clients: int, first_id: int) -> dict:
    import httpx

    interval = 1.0 / rate
    outcomes: list[Outcome] = []
    with httpx.Client(timeout=graph.request_timeout_s + 60,
                      limits=httpx.Limits(max_connections=clients + 2)) as client, \
            cf.ThreadPoolExecutor(clients) as pool, Sampler(graph) as sampler:
        slots = threading.Semaphore(clients)
        futures = []
        start = time.perf_counter()
        i = 0
        while True:
            due = start + i * interval
            if due - start >= seconds:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            slots.acquire()  # at most `clients` requests outstanding
            fut = pool.submit(post, client, graph.url, make_body(first_id + i, source))
            fut.add_done_callback(lambda _: slots.release())
            futures.append(fut)
            i += 1
        outcomes = [f.result() for f in futures]
        wall = time.perf_counter() - start
    ok = [o.seconds for o in outcomes if o.status == 200]
    others = [o for o in outcomes if o.status not in (200, 503)]
    return {"sent": len(outcomes), "wall_s": wall, "200": len(ok),
            "503": sum(o.status == 503 for o in outcomes), "other": len(others),
            "other_kinds": sorted({f"{o.status} {o.code}" for o in others}),
            "codes_503": sorted({o.code for o in outcomes if o.status == 503}),
            "p50": percentile(ok, 0.5), "p95": percentile(ok, 0.95), "p99": percentile(ok, 0.99),
            "max_s": max((o.seconds for o in outcomes), default=0.0),
            "max_200_s": max(ok, default=float("nan")),
            "most_held": sampler.most_held, "most_waiting": sampler.most_waiting,
            "most_in_flight": dict(sampler.most_in_flight)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each run")
    parser.add_argument("--clients", type=int, default=12, help="most requests outstanding at once")
    parser.add_argument("--rates", default="1,2,4", help="multiples of the sustainable rate")
    parser.add_argument("--calibrate", type=int, default=4, help="requests in the calibration")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="LIPSERVE_REQUEST_TIMEOUT_S")
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    sys.path.insert(0, str(ROOT))  # devtools (the test clips) is not installed
    from devtools import testmedia

    with Graph(args.port, args.request_timeout) as graph:
        testmedia.write_demo_clip(graph.data / "src.mp4", seconds=args.clip_seconds, size=(320, 240))
        gate = graph.state("Ingress")
        print(f"ingress gate: max_active {gate['max_active']}, max_waiting {gate['max_waiting']}; "
              f"request_timeout_s {args.request_timeout:g}; clients at most {args.clients}; "
              f"{os.cpu_count()} CPUs", flush=True)
        pids = graph.pids()
        sustainable = calibrate(graph, "src.mp4", gate["max_active"], args.calibrate)
        rows = []
        for n, k in enumerate(float(x) for x in args.rates.split(",")):
            print(f"\n--- {k:g}x: {k * sustainable:.3f} req/s for {args.seconds:g} s", flush=True)
            row = run_at(graph, "src.mp4", k * sustainable, args.seconds, args.clients, first_id=100_000 * (n + 1))
            row["k"] = k
            rows.append(row)
            print(f"sent {row['sent']}: 200 x{row['200']}, 503 x{row['503']} {row['codes_503']}, other x{row['other']} "
                  f"{row['other_kinds']}; 200s p50 {row['p50']:.1f} s, p95 {row['p95']:.1f} s, p99 {row['p99']:.1f} s, "
                  f"max {row['max_200_s']:.1f} s; slowest answer of any kind {row['max_s']:.1f} s "
                  f"(request_timeout_s {args.request_timeout:g}); ingress held at most {row['most_held']} "
                  f"({row['most_waiting']} waiting); stage calls in flight at most {row['most_in_flight']}", flush=True)
        import httpx

        with httpx.Client(timeout=args.request_timeout + 60) as client:
            after = post(client, graph.url, make_body(999_999, "src.mp4", word="After the burst."))
        print(f"\nafter the runs: one request -> HTTP {after.status} in {after.seconds:.1f} s", flush=True)
        peaks = {name: rss_kib(pid) for name, pid in pids.items()}
        same = graph.pids() == pids

    print("\n== summary (a shared 2-core machine: figures are noisy) ==")
    print(f"sustainable rate {sustainable:.3f} req/s; {args.clients} clients; {args.seconds:g} s per run")
    print(f"{'rate':>5} {'sent':>5} {'200':>5} {'503':>5} {'other':>5} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
          f"{'max s':>7} {'held':>5}")
    for row in rows:
        print(f"{row['k']:>4g}x {row['sent']:>5} {row['200']:>5} {row['503']:>5} {row['other']:>5} {row['p50']:>7.1f} "
              f"{row['p95']:>7.1f} {row['p99']:>7.1f} {row['max_s']:>7.1f} {row['most_held']:>5}")
    print("replica peak RSS (VmHWM) over the whole session: " + ", ".join(
        f"{name} {v['VmHWM'] / 1024:.0f} MiB" for name, v in peaks.items()))
    print(f"replicas restarted during the runs: {'no' if same else 'YES'}")
    worst = max(row["max_s"] for row in rows)
    verdict = (all(row["other"] == 0 for row in rows) and worst < args.request_timeout + 5 and after.status == 200)
    print(f"only 200 and 503, nothing past request_timeout_s, serving afterwards: {'yes' if verdict else 'NO'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
