"""Forward time of the lip-sync networks and the Wav2Lip mel front end, on this machine.

Real architectures, synthetic (detinit) weights: the timings are real, the outputs are not meaningful.
The networks come from lipserve's loaders (so in the layout serving uses: channels_last, eval);
`--plain` also times the plain NCHW modules for comparison. S3FD is timed as a network only (no
box post-processing). Each figure is the best of `--repeats` calls after a warm-up; the CPU time
(all threads together) is printed too, since it is less disturbed by other load on a shared machine.
Run: `python benchmarks/bench_lipsync_networks.py [--repeats N] [--plain]`.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lipserve.audio import mel_chunks, melspectrogram
from lipserve.device import autocast_dtype, pick_device
from lipserve.lipsync.networks import load_s3fd, load_wav2lip
from lipserve.models.s3fd import S3FD
from lipserve.models.wav2lip import Wav2Lip
from lipserve.settings import Settings
from lipserve.weights.formats import write_checkpoint
from lipserve.weights.synthetic import fill_synthetic


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the fastest of `repeats` calls, after one warm-up."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def time_wav2lip(net, device, amp, batch: int, repeats: int, label: str) -> None:
    mel = torch.rand(batch, 1, 80, 16, device=device) * 8 - 4
    face = torch.rand(batch, 6, 96, 96, device=device)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            net(mel, face)

    wall, cpu = best_of(run, repeats)
    print(f"Wav2Lip {label} batch {batch}: {wall / batch * 1e3:.1f} ms per frame "
          f"({wall:.2f} s per batch; CPU time {cpu / batch * 1e3:.1f} ms per frame)")


def time_s3fd(net, device, height: int, width: int, repeats: int, label: str) -> None:
    frame = torch.rand(1, 3, height, width, device=device) * 255 - 117

    def run():
        with torch.inference_mode():
            net(frame)

    wall, cpu = best_of(run, repeats)
    print(f"S3FD {label} network only, one {width}x{height} frame: {wall:.3f} s (CPU time {cpu:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plain", action="store_true", help="also time the plain NCHW modules")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the synthetic-weights warning is expected here

    device = pick_device(args.device)
    amp = autocast_dtype(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, autocast {amp}; synthetic weights")

    wav = (0.3 * np.sin(2 * np.pi * 220 * np.arange(32000) / 16000)).astype(np.float32)
    wall, _ = best_of(lambda: mel_chunks(melspectrogram(wav), 25.0), args.repeats * 3)
    print(f"mel spectrogram + chunks, 2.0 s of audio: {wall * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory() as weights_dir:
        write_checkpoint(Path(weights_dir) / "s3fd.pth", "s3fd", fill_synthetic(S3FD()).state_dict())
        settings = Settings(weights_dir=Path(weights_dir), allow_synthetic_weights=True)
        wav2lip, _ = load_wav2lip(settings, device)
        s3fd = load_s3fd(settings, device)

    for batch in (16, 64):
        time_wav2lip(wav2lip, device, amp, batch, args.repeats, "served")
    if args.plain:
        time_wav2lip(fill_synthetic(Wav2Lip()).eval().to(device), device, amp, 16, args.repeats, "plain NCHW")

    for height, width in ((360, 640), (180, 320)):
        time_s3fd(s3fd, device, height, width, args.repeats, "served")
    if args.plain:
        time_s3fd(fill_synthetic(S3FD()).eval().to(device), device, 360, 640, args.repeats, "plain NCHW")


if __name__ == "__main__":
    main()
