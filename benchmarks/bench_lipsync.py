"""Lip-sync stage timings: our static/track modes against the official script's way, same run.

Input: the generated 10 s 640x360 25 fps clip of a real face (testmedia.astronaut_clip) and 2 s of
speech-like audio, so the answer needs 50 frames. Wav2Lip runs on SYNTHETIC weights (the real
architecture; output not meaningful) and faces are found with the Haar cascade, the detector used
when s3fd.pth is absent -- the same detector for every row, so the ratios compare the work done.

A second table runs `auto` (the default) against `static` on a still head, interleaved, cold face
cache each time: auto's extra detections (5 instead of 1) are its whole extra cost there.

"old way" = what the official inference script does, with the same detector, model, paste and
encoder: decode every source frame, then one detection per output frame at full resolution,
smoothed over 5 frames as the official script does.

S3FD is timed separately on synthetic weights (its boxes are noise): network time per frame and
post-processing time per frame are reported apart, the latter with the top-k candidate cap this
code uses (uncapped, synthetic weights leave ~20k candidates per 640x360 frame; docs/FACTS.md).

Usage: .venv/bin/python benchmarks/bench_lipsync.py   (about 1-3 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools (the test clips) is not installed

from devtools import testmedia  # noqa: E402
from lipserve import media  # noqa: E402
from lipserve.audio.wav2lip_mel import melspectrogram  # noqa: E402
from lipserve.lipsync import LipSyncer, LipSyncOptions  # noqa: E402
from lipserve.lipsync.detectors import S3FDDetector, detect_boxes  # noqa: E402
from lipserve.lipsync.faces import interpolate_track, padded_crop_boxes  # noqa: E402
from lipserve.lipsync.timeline import mel_for_output  # noqa: E402
from lipserve.models.s3fd import S3FD  # noqa: E402
from lipserve.settings import Settings  # noqa: E402
from lipserve.weights.synthetic import fill_synthetic  # noqa: E402

STEPS = ("decode", "detect", "mel", "model", "paste", "encode")


def old_way(syncer: LipSyncer, video: bytes, speech: np.ndarray, rate: int, options: LipSyncOptions) -> dict:
    """The official script's work pattern, with our detector/model/paste/encoder."""
    timings = dict.fromkeys(STEPS, 0.0)
    t = time.perf_counter()
    info = media.probe(video)
    stats: dict = {}
    frames = media.decode_frames(video, stats=stats)  # every source frame
    timings["decode"] = time.perf_counter() - t

    n_out = media.frames_needed(info.fps, len(speech) / rate)
    t = time.perf_counter()
    height, width = frames.shape[1:3]
    source_of = np.arange(n_out) % len(frames)  # the official loop wraps to frame 0
    found = [detect_boxes(syncer.detector, frames[i:i + 1], max(height, width))[0] for i in source_of]
    boxes = interpolate_track(dict(enumerate(found)), n_out, smooth_window=5)  # official smoothing, T=5
    timings["detect"] = time.perf_counter() - t

    t = time.perf_counter()
    mel, starts = mel_for_output(melspectrogram(speech), n_out, info.fps)
    timings["mel"] = time.perf_counter() - t

    # one box per output frame: index the per-output-frame boxes directly
    out_frames = frames[source_of]
    face_boxes = np.round(boxes).astype(np.int64)
    crop_boxes = padded_crop_boxes(face_boxes, syncer.resolve(options).pads, width, height)
    t = time.perf_counter()
    steps = {"model": 0.0, "paste": 0.0}
    generated = syncer._synced_frames(out_frames, crop_boxes, face_boxes, np.ones(n_out, dtype=bool),
                                      np.arange(n_out), mel, starts, steps)
    media.encode_mp4(generated, info.fps, speech, rate)
    timings["model"], timings["paste"] = steps["model"], steps["paste"]
    timings["encode"] = time.perf_counter() - t - steps["model"] - steps["paste"]
    return {"timings": timings, "n_frames": n_out, "decoded": stats["decoded"], "detected": len(found)}


def row(label: str, timings: dict, n_frames: int, decoded: int, detected: int) -> float:
    total = sum(timings[k] for k in STEPS)
    cells = "  ".join(f"{timings[k]:7.2f}" for k in STEPS)
    print(f"{label:<22}{cells}  {total:7.2f}  {n_frames / total:6.1f}  {decoded:5d}  {detected:5d}")
    return total


def bench_s3fd(frames: np.ndarray, repeats: int) -> dict[int, tuple[float, float]]:
    net = S3FD()
    fill_synthetic(net)
    detector = S3FDDetector(net.eval(), torch.device("cpu"), batch_size=1)
    print("\nS3FD on SYNTHETIC weights (boxes are noise; network and post-processing timed apart,")
    print("post-processing with the top-k=750 candidate cap before NMS), seconds per frame:")
    print(f"{'input':<22}{'network':>9}{'postproc':>10}")
    per_frame = {}
    for max_side in (640, 480, 320):
        detector.timings = {"network": 0.0, "postprocess": 0.0}
        detect_boxes(detector, frames[:1], max_side)  # warm-up
        detector.timings = {"network": 0.0, "postprocess": 0.0}
        detect_boxes(detector, frames[:repeats], max_side)
        scale = min(1.0, max_side / max(frames.shape[1:3]))
        size = f"{round(frames.shape[2] * scale)}x{round(frames.shape[1] * scale)}"
        per_frame[max_side] = (detector.timings["network"] / repeats, detector.timings["postprocess"] / repeats)
        print(f"{size:<22}{per_frame[max_side][0]:9.3f}{per_frame[max_side][1]:10.3f}")
    return per_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="speech length")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (fastest shown)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--s3fd-repeats", type=int, default=2)
    parser.add_argument("--no-s3fd", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    clip = testmedia.astronaut_clip(seconds=10.0, fps=25, size=(640, 360), audio="speechlike")
    speech = testmedia.speechlike(args.seconds, sample_rate=16000)
    with tempfile.TemporaryDirectory() as empty:
        syncer = LipSyncer(Settings(weights_dir=empty, allow_synthetic_weights=True, device="cpu"))
    print(f"lip sync, 10 s 640x360 25 fps source, {args.seconds:g} s speech; CPU, torch threads "
          f"{torch.get_num_threads()}; Wav2Lip SYNTHETIC weights; detector {syncer.detector.name}; "
          f"batch {syncer.batch_size()}")
    syncer.sync(clip, speech[:3200], 16000, LipSyncOptions(face_mode="static"))  # warm-up (first-call costs)

    print(f"\n{'seconds':<22}" + "  ".join(f"{k:>7}" for k in STEPS) + "    total     fps  decod  detec")
    # Each configuration runs `repeats` times, interleaved; the fastest run is shown (the machine is shared).
    best: dict[str, tuple] = {}
    label = "track, cached faces"
    for _ in range(args.repeats):
        for mode in ("auto", "static", "track", label, "old way"):
            if mode == "old way":
                old = old_way(syncer, clip, speech, 16000, LipSyncOptions())
                run = (old["timings"], old["n_frames"], old["decoded"], old["detected"])
            else:
                if mode != label:
                    syncer.clear_face_cache()  # cold: this video's faces not yet known
                r = syncer.sync(clip, speech, 16000, LipSyncOptions(face_mode=mode.split(",")[0]))
                run = (r.timings, r.n_frames, r.decoded_frames, r.detected_frames)
            if mode not in best or sum(run[0].values()) < sum(best[mode][0].values()):
                best[mode] = run
    totals = {mode: row(mode, *run) for mode, run in best.items()}
    timings = {mode: run[0] for mode, run in best.items()}
    old = {"timings": timings["old way"]}
    totals["old"] = totals["old way"]

    def front(t: dict) -> float:
        return t["decode"] + t["detect"]

    def besides_model(t: dict) -> float:  # the model's work is identical in every row
        return sum(v for k, v in t.items() if k != "model")

    print("\nold way / new (same run; the model step is the same work in every row, so its spread is machine noise):")
    for mode in ("static", "track", label):
        print(f"  {mode:<20} total {totals['old'] / totals[mode]:5.2f}x   "
              f"all but model {besides_model(old['timings']) / max(1e-6, besides_model(timings[mode])):5.1f}x   "
              f"decode+detect {front(old['timings']) / max(1e-6, front(timings[mode])):6.1f}x")

    still = testmedia.astronaut_clip(seconds=10.0, fps=25, size=(640, 360), audio="speechlike", motion=False)
    print("\nstill head, same source size: auto (the default) against static, interleaved, cold face cache")
    print(f"{'seconds':<22}" + "  ".join(f"{k:>7}" for k in STEPS) + "    total     fps  decod  detec")
    best_still: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for mode in ("static", "auto"):
            syncer.clear_face_cache()
            r = syncer.sync(still, speech, 16000, LipSyncOptions(face_mode=mode))
            run = (r.timings, r.n_frames, r.decoded_frames, r.detected_frames)
            if mode not in best_still or sum(run[0].values()) < sum(best_still[mode][0].values()):
                best_still[mode] = run
    still_totals = {mode: row(f"{mode} (still head)", *run) for mode, run in best_still.items()}
    print(f"  auto / static total: {still_totals['auto'] / still_totals['static']:.3f} "
          f"(auto: {best_still['auto'][3]} detections, static: {best_still['static'][3]})")

    if not args.no_s3fd:
        frames = media.decode_frames(clip, count=max(1, args.s3fd_repeats))
        per_frame = bench_s3fd(frames, max(1, args.s3fd_repeats))
        n_out = best["static"][1]
        net_full, net_track = per_frame[640][0], per_frame[480][0]
        print(f"\nS3FD network seconds for this answer ({n_out} frames; network only, capped post-processing apart):")
        print(f"  old way  {n_out} x {net_full:.2f} = {n_out * net_full:6.1f} s (every output frame, full 640x360)")
        print(f"  static   1 x {net_full:.2f} = {net_full:6.1f} s")
        print(f"  auto     5 x {net_track:.2f} = {5 * net_track:6.1f} s (still head: 5 probes at 480x270)")
        keyframes = -(-n_out // 5)
        print(f"  track    {keyframes} x {net_track:.2f} = {keyframes * net_track:6.1f} s (every 5th frame at 480x270)")
        print("  cached   0 s")


if __name__ == "__main__":
    main()
