"""fp32 eager against the fast paths (lipserve.fast), per stage and end to end, in one run.

Cases: a new video (face boxes, reference voice and speaker embedding not yet known) and the
same video again, with 2 s and 10 s of speech fed as a wav (options.audio, so both paths get the
same speech and TTS is not in the figures). Source: the 10 s 640x360 25 fps test clip, as in
docs/FACTS.md. In process, eager and fast run interleaved in one process on the same loaded models
(only the runners are swapped), best of --repeats; `--serve` adds the same requests through a
local Ray Serve graph, deployed once with every backend eager and once with the defaults.

Models run on SYNTHETIC weights (real architectures; outputs not meaningful). Faces come from
the Haar cascade (no s3fd.pth), as in the demo. CPU seconds are printed beside wall seconds:
on a shared machine wall time swings with other people's jobs, CPU time much less.

    .venv/bin/python benchmarks/bench_fast.py [--repeats 2] [--serve]

The old way's figure is not re-run here: 73.8 s per request, the official scripts as the old
server ran them on this kind of machine (docs/FACTS.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io.wavfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import testmedia  # noqa: E402
from lipserve.cache import LRUCache  # noqa: E402
from lipserve.contract import LipVideoRequest, RequestOptions  # noqa: E402
from lipserve.settings import Settings  # noqa: E402

OLD_WAY_SECONDS = 73.8          # docs/FACTS.md: whole request, old-server style, 10 s source, ~2 s speech
OFFICIAL_VOICE_2S = 0.87 + 0.90  # docs/FACTS.md: FreeVC convert.py WavLM + synthesis for ~2 s of speech
STAGE_KEYS = ("tts", "faces", "voice", "lipsync")


class Swap:
    """Switches a loaded Pipeline's stages between their eager modules and their fast runners."""

    def __init__(self, pipeline):
        from lipserve.fast.networks import EagerSynthesizer

        self.voice, self.lipsync = pipeline.stages.voice, pipeline.stages.lipsync
        self.fast = (self.voice.content_encoder, self.voice.synthesizer_runner, self.lipsync.lip_model)
        self.eager = (self.voice.wavlm, EagerSynthesizer(self.voice.synthesizer), self.lipsync.model)

    def use(self, which: str) -> None:
        runners = self.fast if which == "fast" else self.eager
        self.voice.content_encoder, self.voice.synthesizer_runner, self.lipsync.lip_model = runners

    def forget_video(self) -> None:
        """A new video: nothing about it is cached."""
        self.lipsync.clear_face_cache()
        self.voice.speaker_cache = LRUCache(self.voice.speaker_cache.maxsize)
        self.voice.reference_cache = LRUCache(self.voice.reference_cache.maxsize)


def in_process(args, root: Path, cases: list[tuple[float, str]]) -> dict:
    from lipserve.pipeline import Pipeline

    settings = Settings(storage_root=root, weights_dir=root / "no-weights", allow_synthetic_weights=True,
                        device="cpu", tts_order=["piper"])
    start = time.perf_counter()
    pipeline = Pipeline(settings)
    print(f"models loaded in {time.perf_counter() - start:.1f} s; fast paths: "
          + ", ".join(f"{k}={v['backend']}" for d in (pipeline.stages.voice.describe(), pipeline.stages.lipsync.describe())
                      for k, v in d["fast_paths"].items()), flush=True)
    swap = Swap(pipeline)
    details: dict = {}
    sync, convert = pipeline.stages.lipsync.sync, pipeline.stages.voice.convert

    def sync_recorded(*a, **k):
        result = sync(*a, **k)
        details["lipsync"], details["frames"] = result.timings, result.n_frames
        return result

    def convert_recorded(*a, **k):
        result = convert(*a, **k)
        details["voice"] = result.timings
        return result

    pipeline.stages.lipsync.sync, pipeline.stages.voice.convert = sync_recorded, convert_recorded

    def request(speech: str, n: int, which: str, new: bool) -> dict:
        swap.use(which)
        if new:
            swap.forget_video()
        req = LipVideoRequest(word="", user_video_gs="src.mp4", output_video_gs=f"out/{n}.mp4",
                              options=RequestOptions(audio=speech, overwrite=True))
        wall, cpu = time.perf_counter(), time.process_time()
        response = pipeline.run(req)
        row = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
               **{k: response.step_times.get(k, 0.0) for k in STAGE_KEYS},
               "wavlm": details["voice"]["wavlm"], "synthesis": details["voice"]["synthesis"],
               "lip_model": details["lipsync"]["model"], "frames": details["frames"]}
        return row

    for which in ("eager", "fast"):  # warm-up: first-call costs (librosa's JIT, kernel selection) out of the figures
        request(cases[0][1], 0, which, new=True)
    best: dict = {}
    n = 1
    for _ in range(args.repeats):
        for seconds, speech in cases:
            for video in ("new", "same"):
                for which in ("eager", "fast"):
                    row = request(speech, n, which, new=video == "new")
                    n += 1
                    key = (seconds, video, which)
                    if key not in best or row["wall"] < best[key]["wall"]:
                        best[key] = row
    return best




def print_table(title: str, best: dict) -> None:
    print(f"\n{title}")
    head = (f"{'speech':>6} {'video':<5} {'path':<5} {'wall':>6} {'cpu':>6} | " + " ".join(f"{k:>7}" for k in STAGE_KEYS)
            + f" | {'wavlm':>6} {'synth':>6} {'w2l':>6} {'s/frame':>7} | {'vs old':>6}")
    print(head)
    for (seconds, video, which), row in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        per_frame = row["lipsync"] / max(1, row["frames"]) if row.get("frames") else float("nan")
        cells = " ".join(f"{row.get(k, 0.0):7.2f}" for k in STAGE_KEYS)
        print(f"{seconds:5g}s {video:<5} {which:<5} {row['wall']:6.2f} {row.get('cpu', float('nan')):6.2f} | {cells} | "
              f"{row.get('wavlm', float('nan')):6.2f} {row.get('synthesis', float('nan')):6.2f} "
              f"{row.get('lip_model', float('nan')):6.2f} {per_frame:7.3f} | {OLD_WAY_SECONDS / row['wall']:5.1f}x")
    for seconds in sorted({k[0] for k in best}):
        for video in ("new", "same"):
            e, f = best.get((seconds, video, "eager")), best.get((seconds, video, "fast"))
            if e and f:
                voice = (f"; voice {e['voice'] / f['voice']:.2f}x" if f.get("voice") else "")
                cpu = f" (cpu {e['cpu'] / f['cpu']:.2f}x)" if f.get("cpu") else ""
                print(f"  {seconds:g} s, {video} video: fast is {e['wall'] / f['wall']:.2f}x eager end to end{cpu}{voice}")


def through_serve(args, root: Path, cases: list[tuple[float, str]]) -> dict:
    import httpx

    from devtools.local_graph import local_graph
    from pipeline_graph import LOCAL_CONFIG, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    best: dict = {}
    url = f"http://127.0.0.1:{args.port}/api/v1/lip-video"
    n = 1000
    for which in ("eager", "fast"):
        backend = "eager" if which == "eager" else "auto"
        env = {"LIPSERVE_STORAGE_ROOT": str(root), "LIPSERVE_WEIGHTS_DIR": str(root / "no-weights"),
               "LIPSERVE_ALLOW_SYNTHETIC_WEIGHTS": "1", "LIPSERVE_TTS_ORDER": "piper",
               **{f"LIPSERVE_{net}_BACKEND": backend for net in ("WAVLM", "SYNTHESIZER", "WAV2LIP", "S3FD")}}
        with local_graph(build_app(LOCAL_CONFIG, env=env), port=args.port) as graph:  # a fresh Ray per backend
            print(f"\nServe graph with {which} backends up on a local Ray in {graph.deploy_s:.1f} s", flush=True)
            # one request first, as the in-process run warms up: first-call costs (librosa's JIT in the voice
            # replica, kernel selection) are not what a warm replica pays
            n += 1
            warm = {"word": "", "user_video_gs": "src.mp4", "output_video_gs": f"out/s{n}.mp4",
                    "options": {"audio": cases[0][1], "overwrite": True}}
            httpx.post(url, json=warm, timeout=900).raise_for_status()
            for seconds, speech in cases:
                for video in ("new", "same"):
                    # a new video through Serve: a copy of the clip with other bytes (the caches are by content)
                    source = "src.mp4"
                    if video == "new":
                        n += 1
                        source = f"new-{n}.mp4"
                        (root / source).write_bytes((root / "src.mp4").read_bytes() + n.to_bytes(4, "big"))
                    for _ in range(args.repeats if video == "same" else 1):
                        n += 1
                        body = {"word": "", "user_video_gs": source, "output_video_gs": f"out/s{n}.mp4",
                                "options": {"audio": speech, "overwrite": True}}
                        wall = time.perf_counter()
                        r = httpx.post(url, json=body, timeout=900)
                        r.raise_for_status()
                        row = {"wall": time.perf_counter() - wall, **{k: r.json()["step_times"].get(k, 0.0)
                                                                      for k in STAGE_KEYS}}
                        key = (seconds, video, which)
                        if key not in best or row["wall"] < best[key]["wall"]:
                            best[key] = row
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per case and path; the fastest is shown")
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0], help="speech lengths")
    parser.add_argument("--serve", action="store_true", help="also through a local Ray Serve graph (starts Ray)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    root = Path(tempfile.mkdtemp(prefix="lipserve-bench-fast-"))
    (root / "out").mkdir()
    testmedia.write_demo_clip(root / "src.mp4", seconds=10.0)
    cases = []
    for seconds in args.seconds:
        name = f"speech-{seconds:g}s.wav"
        speech = testmedia.speechlike(seconds, 16000, seed=4)
        scipy.io.wavfile.write(root / name, 16000, (np.clip(speech, -1, 1) * 32767).astype(np.int16))
        cases.append((seconds, name))
    print(f"bench_fast: 10 s 640x360 25 fps source; speech {', '.join(f'{s:g} s' for s in args.seconds)} fed as a wav; "
          f"SYNTHETIC weights (timings real, outputs not meaningful); {os.cpu_count()} CPUs; "
          "a shared machine: compare the ratios, and CPU seconds, more than absolute wall times")
    best = in_process(args, root, cases)
    print_table("in process (best of %d), seconds" % args.repeats, best)
    print(f"  old way (official scripts, old-server style, docs/FACTS.md): {OLD_WAY_SECONDS} s per request; "
          f"official FreeVC conversion of ~2 s: {OFFICIAL_VOICE_2S:.2f} s")
    two = best.get((2.0, "new", "fast"))
    if two:
        print(f"  voice conversion, 2 s, fast: {two['voice']:.2f} s = {OFFICIAL_VOICE_2S / two['voice']:.2f}x the official "
              f"code's figure; lip sync {two['lipsync'] / max(1, two['frames']):.3f} s per output frame")
    if args.serve:
        serve_best = through_serve(args, root, cases)
        print_table("through Ray Serve (HTTP, best of the runs), seconds", serve_best)
    print("\nNOTE: synthetic weights; figures from a shared 2-core machine (the lead re-measures on a quiet box)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
