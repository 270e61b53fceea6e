"""`seed` makes a request reproducible across processes: TTS (piper's own noise), the voice's prior
noise and everything after them give byte-identical videos from two separate `lipserve run`s."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from devtools import testmedia
from lipserve import media


def run_cli(tmp_path, weights_dir, out_name: str, seed: int | None) -> bytes:
    src = tmp_path / "me.mp4"
    if not src.exists():
        src.write_bytes(testmedia.astronaut_clip(seconds=2.0, fps=25, size=(320, 240), audio="speechlike"))
    out = tmp_path / out_name
    env = {**os.environ, "LIPSERVE_WEIGHTS_DIR": str(weights_dir), "LIPSERVE_TTS_ORDER": "piper",
           "LIPSERVE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lipserve.cli", "run", "--video", str(src), "--text", "Nice to meet you.",
               "--out", str(out), "--synthetic-weights", "--engine", "piper"]
    if seed is not None:
        command += ["--seed", str(seed)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_video_in_two_processes(tmp_path, voice_small_wavlm_dir):
    first = run_cli(tmp_path, voice_small_wavlm_dir, "a.mp4", seed=1234)
    second = run_cli(tmp_path, voice_small_wavlm_dir, "b.mp4", seed=1234)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    audio = media.read_audio(first, 16000)
    assert audio.size > 8000 and abs(audio).max() > 0.01  # a real video with speech, not an empty match
