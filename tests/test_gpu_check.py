"""The one-shot device check (benchmarks/gpu) runs here, on the CPU, small, so no line of it rots
before a GPU box is at hand; and what it carries stays documented and under the 64 MiB limit."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def _pins() -> dict[str, str]:
    sys.path.insert(0, str(GPU))
    from wheels import pinned

    return pinned()


def test_the_wheel_list_is_pinned_documented_and_carries_no_ray_or_torch():
    pins = _pins()
    assert pins and all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in pins.values()), pins
    assert not {"ray", "torch", "numpy", "scipy"} & set(pins)  # too big, or already on the box
    readme = (GPU / "README.md").read_text()
    table = re.findall(r"^\| ([a-z][a-z0-9-]+) ([0-9][^ ]*)(?: \([^)]*\))? \| ([0-9.]+) \|", readme, re.M)
    documented = {re.sub(r"[-_.]+", "_", name): version for name, version, _ in table}
    assert documented == pins  # every carried wheel in the README's table, same version
    sizes = [float(size) for _, _, size in table]
    total = float(re.search(r"\*\*(\d+) wheels\*\* \| \*\*([0-9.]+)\*\*", readme).group(2))
    assert math.isclose(sum(sizes), total, abs_tol=0.05) and total < 60


@pytest.mark.slow
def test_the_device_check_runs_on_the_cpu_and_reports_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    env.pop("OUT", None)
    # inputs made by the check itself (speech-like noise), as on a fresh clone
    proc = subprocess.run([str(GPU / "run.sh"), "--device", "cpu", "--quick", "--out", str(out),
                           "--inputs", str(tmp_path / "none")], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.log", "report.json", "report.md"]  # a lent box returns at most 8 files
    report = json.loads((out / "report.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["environment", "inputs", "networks", "pipeline", "memory", "throughput", "oom", "encode"]
    assert {n: s["status"] for n, s in sections.items() if s["status"] != "ok"} == {}

    networks = sections["networks"]["data"]["rows"]  # network, batch, precision, ms/item, ..., max |d|, mean |d|, notes
    assert {r[0].split(" ")[0] for r in networks} == {"Wav2Lip", "S3FD", "WavLM-Large", "SynthesizerTrn"}
    assert all(r[3] > 0 for r in networks)
    assert all(r[6] == 0 for r in networks if r[2] == "fp32")
    bf16 = [r for r in networks if r[2] == "bf16"]
    assert bf16 and all(0 < r[6] < 0.1 and r[7] <= r[6] for r in bf16)  # a real, bounded difference

    rows = sections["pipeline"]["data"]["rows"]  # request, speech s, step times..., frames, fps, fps, cache hit
    keys = ["download", "probe", "tts", "faces", "voice", "lipsync", "upload", "first_frame", "total"]
    assert [r[0] for r in rows] == ["cold (first request)", "warm, new video", "warm, same video"]
    for row in rows:
        times = dict(zip(keys, row[2:11]))
        assert 0 < times["first_frame"] < times["total"] and times["lipsync"] > 0
        assert row[1] == 1.0 and row[11] == 25  # quick: 1 s of speech at 25 fps
    assert [r[-1] for r in rows] == [False, False, True]  # face cache: only the same video hits

    (throughput,) = sections["throughput"]["data"]["rows"]
    assert throughput[0] == 2 and throughput[1] == "on" and throughput[9] > 0  # Wav2Lip forwards counted
    encoders = {r[0]: r for r in sections["encode"]["data"]["rows"]}
    assert encoders["libx264"][-1] == "ok" and "h264_nvenc" in encoders  # nvenc: ok or why not
    markdown = (out / "report.md").read_text()
    assert "SYNTHETIC WEIGHTS" in markdown and "| cold (first request) |" in markdown
