"""Cold starts: how long a fresh stage takes to start, and its first request against later ones.

    .venv/bin/python benchmarks/bench_cold_start.py process   # one process, no Ray (lipserve.pipeline.Pipeline)
    .venv/bin/python benchmarks/bench_cold_start.py serve     # serve.run of serve_config.local.yaml, over HTTP
    .venv/bin/python benchmarks/bench_cold_start.py both

Every request is the `make demo` request (its 4 s moving astronaut clip, its sentence, face mode
track) with the stages' caches switched off (LIPSERVE_*_CACHE_SIZE=0), so request 1 and request N
do exactly the same work: what request 1 pays extra is the cold start. Synthetic weights (no
checkpoints): the timings are real, the outputs are NOT meaningful.

`process` runs in a fresh child interpreter (cold imports) and prints the start broken down:
imports, each stage's construction (of it: checkpoint reads, synthetic-weight fills), warm-up,
then each request's step times. `serve` times the local Ray's start, serve.run (every replica constructed,
loaded and warmed: Serve only returns once they are ready), then the first successful request
and the later ones; each replica's own start breakdown comes from /api/v1/models when the
stages report one. `--no-warmup` sets LIPSERVE_WARMUP=0 (ignored by a checkout without it).

Figures only, nothing asserted. On a shared machine the wall times are noisy; the first/warm
ratio within one run is the figure to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello! This video was made by lipserve."  # the demo's sentence
CLIP_SECONDS = 4.0
NO_CACHES = {"LIPSERVE_TTS_CACHE_SIZE": "0", "LIPSERVE_SPEAKER_CACHE_SIZE": "0", "LIPSERVE_FACE_CACHE_SIZE": "0"}
STEPS = ("tts", "faces", "voice", "lipsync", "total")


def base_env(data: Path, weights: Path, warmup: bool) -> dict[str, str]:
    env = {"LIPSERVE_STORAGE_ROOT": str(data), "LIPSERVE_WEIGHTS_DIR": str(weights),
           "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper", **NO_CACHES}
    if not warmup:
        env["LIPSERVE_WARMUP"] = "0"
    return env


def request_body(i: int) -> dict:
    return {"word": TEXT, "user_video_gs": "src.mp4", "output_video_gs": f"out/{i}.mp4", "tts_lang": "en",
            "options": {"overwrite": True, "face_mode": "track"}}


def summarize(label: str, runs: list[dict]) -> dict:
    """runs: [{"wall": s, "steps": {...}}] in order; prints first vs the median of the rest."""
    first, rest = runs[0], runs[1:]
    print(f"\n{label}: request 1 against the median of requests 2..{len(runs)} (same request, caches off)")
    print(f"  {'':<8} {'first':>8} {'warm':>8} {'ratio':>7}")
    ratios = {}
    for key in ("wall", *STEPS):
        a = first["wall"] if key == "wall" else first["steps"].get(key)
        bs = [r["wall"] if key == "wall" else r["steps"].get(key) for r in rest]
        bs = [b for b in bs if b is not None]
        if a is None or not bs:
            continue
        b = statistics.median(bs)
        ratios[key] = a / b if b else float("nan")
        print(f"  {key:<8} {a:8.2f} {b:8.2f} {ratios[key]:7.2f}x")
    return ratios


# ---------------------------------------------------------------- one process

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
marks = {}
import torch
marks["import torch"] = time.perf_counter() - t0
from lipserve.settings import Settings
t = time.perf_counter()
import lipserve.tts
marks["import lipserve.tts"] = time.perf_counter() - t
t = time.perf_counter()
import lipserve.voice
marks["import lipserve.voice"] = time.perf_counter() - t
t = time.perf_counter()
import lipserve.lipsync
marks["import lipserve.lipsync"] = time.perf_counter() - t

# time what the constructors spend reading checkpoints and filling synthetic weights
import lipserve.weights.resolve as resolve
spent = {"synthetic fill": 0.0}
fill = resolve.fill_synthetic
def timed_fill(module):
    t = time.perf_counter()
    try:
        return fill(module)
    finally:
        spent["synthetic fill"] += time.perf_counter() - t
resolve.fill_synthetic = timed_fill

from lipserve.contract import LipVideoRequest, RequestOptions
from lipserve.pipeline import Pipeline
settings = Settings()
stages = {}
for name, build in (("tts", lambda: __import__("lipserve.tts", fromlist=["x"]).SpeechSynthesizer(settings)),
                    ("voice", lambda: __import__("lipserve.voice", fromlist=["x"]).VoiceConverter(settings)),
                    ("lipsync", lambda: __import__("lipserve.lipsync", fromlist=["x"]).LipSyncer(settings))):
    before = spent["synthetic fill"]
    t = time.perf_counter()
    stages[name] = build()
    if name == "tts":
        stages[name].preload()
    marks[f"build {name}"] = time.perf_counter() - t
    marks[f"  of it synthetic fill ({name})"] = spent["synthetic fill"] - before
import inspect
t = time.perf_counter()
later = {"warm_up": False} if "warm_up" in inspect.signature(Pipeline).parameters else {}
pipeline = Pipeline(settings, tts=stages["tts"], voice=stages["voice"], lipsync=stages["lipsync"], **later)
marks["pipeline (storage client)"] = time.perf_counter() - t
warm = getattr(pipeline, "warm_up", None)
if warm is not None and getattr(settings, "warmup", False):
    t = time.perf_counter()
    report = warm()
    marks["warm-up"] = time.perf_counter() - t
    for stage, paths in (report or {}).items():
        marks[f"  warm-up {stage}"] = paths["seconds"]
        print(f"WARMUP {stage} " + json.dumps(paths), flush=True)
print("MARKS " + json.dumps(marks), flush=True)
for i in range(int(sys.argv[1])):
    request = LipVideoRequest(word=TEXT, user_video_gs="src.mp4", output_video_gs=f"out/{i}.mp4", tts_lang="en",
                              options=RequestOptions(overwrite=True, face_mode="track"))
    t, c = time.perf_counter(), time.process_time()
    response = pipeline.run(request)
    print("RUN " + json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c,
                               "steps": response.step_times}), flush=True)
'''


def bench_process(requests: int, warmup: bool) -> dict:
    from devtools import testmedia

    data = Path(tempfile.mkdtemp(prefix="lipserve-cold-"))
    weights = data / "no-weights"
    weights.mkdir()
    testmedia.write_demo_clip(data / "src.mp4", seconds=CLIP_SECONDS)
    env = {**os.environ, **base_env(data, weights, warmup), "LIPSERVE_DEVICE": "cpu", "LIPSERVE_TORCH_THREADS": "2",
           "OMP_NUM_THREADS": "2"}
    code = f"TEXT = {TEXT!r}\n" + CHILD
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(requests)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"child failed with {proc.returncode}")
    marks, runs = {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("MARKS "):
            marks = json.loads(line[6:])
        elif line.startswith("WARMUP "):
            print("  " + line)
        elif line.startswith("RUN "):
            runs.append(json.loads(line[4:]))
    print(f"\none process (warm-up {'on' if warmup else 'off'}), child wall {time.perf_counter() - t:.1f}s")
    print("  start, in order:")
    for key, seconds in marks.items():
        print(f"    {key:<36} {seconds:7.2f}s")
    start = sum(v for k, v in marks.items() if not k.startswith("  "))
    print(f"    {'= start (imports + builds + warm-up)':<36} {start:7.2f}s")
    for i, r in enumerate(runs):
        print(f"  request {i + 1}: wall {r['wall']:6.2f}s cpu {r['cpu']:6.2f}s | "
              + " ".join(f"{k}={r['steps'].get(k, 0):.2f}" for k in STEPS))
    ratios = summarize("one process", runs)
    return {"start_s": start, "marks": marks, "runs": runs, "ratios": ratios}


# ---------------------------------------------------------------- through Serve

def bench_serve(requests: int, warmup: bool, port: int) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import httpx

    from devtools.local_graph import local_graph
    from devtools import testmedia
    from pipeline_graph import LOCAL_CONFIG, build_app

    data = Path(tempfile.mkdtemp(prefix="lipserve-cold-"))
    weights = data / "no-weights"
    weights.mkdir()
    testmedia.write_demo_clip(data / "src.mp4", seconds=CLIP_SECONDS)
    env = base_env(data, weights, warmup)
    runs = []
    with local_graph(build_app(LOCAL_CONFIG, env=env), port=port, request_timeout_s=600) as graph:
        t1 = time.perf_counter()
        t_ray = graph.cluster.start_s
        t_deploy = graph.deploy_s - t_ray
        with httpx.Client(base_url=graph.url, timeout=600) as client:
            for i in range(requests):
                t = time.perf_counter()
                r = client.post("/api/v1/lip-video", json=request_body(i))
                wall = time.perf_counter() - t
                if r.status_code != 200:
                    raise SystemExit(f"request {i} failed: HTTP {r.status_code} {r.text[:500]}")
                runs.append({"wall": wall, "steps": r.json()["step_times"]})
                if i == 0:
                    t_first = t_deploy + time.perf_counter() - t1
            models = client.get("/api/v1/models").json()
    print(f"\nthrough Serve (warm-up {'on' if warmup else 'off'}): local Ray {t_ray:.1f}s, serve.run {t_deploy:.1f}s, "
          f"serve.run -> first successful response {t_first:.1f}s (+ the Ray start = {t_first + t_ray:.1f}s)")
    for name, desc in models.get("stages", {}).items():
        start = desc.get("start_seconds")
        if start:
            print(f"  replica {name:<8} start: " + ", ".join(f"{k} {v:.2f}s" for k, v in start.items()))
    for i, r in enumerate(runs):
        print(f"  request {i + 1}: HTTP {r['wall']:6.2f}s | " + " ".join(f"{k}={r['steps'].get(k, 0):.2f}" for k in STEPS))
    ratios = summarize("through Serve", runs)
    return {"ray_init_s": t_ray, "deploy_s": t_deploy, "deploy_to_first_s": t_first, "runs": runs, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["process", "serve", "both"])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--no-warmup", action="store_true", help="LIPSERVE_WARMUP=0 (the replicas start unwarmed)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    warmup = not args.no_warmup
    if args.mode in ("process", "both"):
        bench_process(args.requests, warmup)
    if args.mode in ("serve", "both"):
        bench_serve(args.requests, warmup, args.port)
    print("\nNOTE: synthetic weights (no checkpoints): timings are real, outputs are NOT meaningful")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
