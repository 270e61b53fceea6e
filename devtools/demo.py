"""`make demo`: the whole graph on a local Ray, one real HTTP request, a summary.

On a fresh clone (no checkpoints in weights/) the stages run on synthetic weights, and this says
so loudly: the pipeline is real end to end, the mouths and voice are not meaningful. With the
checkpoints in weights/ (`lipserve weights fetch`) they are used.

It lives in the development tools, not in the shipped package, because it starts a local Ray.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import httpx

from .local_graph import local_graph

ROOT = Path(__file__).resolve().parents[1]
# what each stage loads; any one missing means that stage runs synthetic
CHECKPOINT_FILES = ("wav2lip_gan.pth", "freevc.pth", "WavLM-Large.pt", "pretrained_bak_5805000.pt")

BANNER = "!" * 78


def quiet_ray() -> None:
    """Keep Ray's own messages that are not the demo user's concern out of the output."""
    # Ray 2.60 turns token authentication on for a new local cluster and warns that it did so: it
    # stays on, without the warning. (Not by setting RAY_AUTH_MODE here: ray, already imported, has
    # read its mode, and the cluster it starts would then ask this driver for a token it never sends.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Serve's progress lines (started, connecting, app ready): the demo says what happened itself
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def deploy_and_request(body: dict, env: dict[str, str], port: int = 8000, timeout_s: float = 600) -> dict:
    """Returns {"status", "result" (the JSON answer), "wall_s" (HTTP round trip), "deploy_s"}."""
    from pipeline_graph import LOCAL_CONFIG, build_app

    quiet_ray()
    with local_graph(build_app(LOCAL_CONFIG, env=env), port=port, request_timeout_s=timeout_s) as graph:
        print(f"local Ray started in {graph.cluster.start_s:.1f}s; graph deployed on it in {graph.deploy_s:.1f}s "
              "(each replica loads its models and warms up in its constructor, so the first request is as "
              "fast as later ones)", flush=True)
        url = f"{graph.url}/api/v1/lip-video"
        print(f"POST {url} {body}", flush=True)
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=timeout_s)
        return {"status": r.status_code, "result": r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else {"text": r.text}, "wall_s": time.perf_counter() - t, "deploy_s": graph.deploy_s}


def loud(lines: list[str]) -> str:
    return "\n".join([BANNER, *(f"!!  {line}" for line in lines), BANNER])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="Hello! This video was made by lipserve.")
    parser.add_argument("--lang", default="en")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the generated source clip")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="local storage root")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="checkpoint folder")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data, weights = args.data.resolve(), args.weights.resolve()
    missing = [f for f in CHECKPOINT_FILES if not (weights / f).is_file()]
    synthetic = bool(missing)
    if synthetic:
        print(loud([f"No checkpoints in {weights} (missing: {', '.join(missing)}).",
                    "The demo runs the REAL pipeline on SYNTHETIC WEIGHTS: the output video is valid,",
                    "but its voice and mouth movements are NOT meaningful.",
                    "Fetch the real checkpoints with `lipserve weights fetch`."]), flush=True)

    from devtools import testmedia
    from lipserve import media

    source = data / "demo" / "astronaut.mp4"
    output = data / "demo" / "astronaut-says.mp4"
    testmedia.write_demo_clip(source, seconds=args.seconds)
    print(f"source clip: {source} ({source.stat().st_size} bytes, the scikit-image astronaut, moving)", flush=True)

    env = {
        "LIPSERVE_STORAGE_ROOT": str(data),
        "LIPSERVE_WEIGHTS_DIR": str(weights),
        "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1" if synthetic else "0",
    }
    body = {"word": args.text, "user_video_gs": "demo/astronaut.mp4",
            "output_video_gs": "demo/astronaut-says.mp4", "tts_lang": args.lang,
            "options": {"overwrite": True}}  # the default face mode (auto) follows the moving face
    answer = deploy_and_request(body, env, port=args.port)
    if answer["status"] != 200:
        print(f"request failed: HTTP {answer['status']}: {answer['result']}", file=sys.stderr)
        return 1
    result, wall = answer["result"], answer["wall_s"]

    info = media.probe(output.read_bytes())
    print()
    print("=" * 78)
    print(f"output video:  {output}")
    print(f"duration:      {result['duration_s']:.2f}s  ({info.width}x{info.height} {info.video_codec}, "
          f"audio: {'yes' if info.has_audio else 'NO'}, {info.fps:g} fps)")
    print("engines:       " + ", ".join(f"{k}={v}" for k, v in result["engines"].items()))
    print("stage times:")
    for stage, seconds in result["step_times"].items():
        print(f"  {stage:<12} {seconds:7.2f}s")
    print(f"HTTP round trip: {wall:.2f}s   cache: {result['cache']}")
    print(f"precision:     {result.get('precision', {})}   frames passed through: "
          f"{result.get('frames_passed_through', 0)}")
    print("warnings:" + ("" if result["warnings"] else "      none"))
    for text in result["warnings"]:
        print(f"  - {text}")
    print("try it in a browser: `serve run serve_config.local.yaml`, then http://127.0.0.1:8000/ (API docs: /docs)")
    print("=" * 78)
    if result["synthetic_weights"]:
        print(loud(["THE MODELS RAN ON SYNTHETIC WEIGHTS: the output is NOT meaningful.",
                    "Fetch the checkpoints with `lipserve weights fetch`, then run `make demo` again."]))
    return 0 if info.has_audio else 1


if __name__ == "__main__":
    sys.exit(main())
