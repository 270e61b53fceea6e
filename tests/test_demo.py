"""`make demo` stays true: the demo deploys the graph on a local Ray and answers one real request."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lipserve import media
from tests.fixtures.ray import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_makes_a_playable_video_and_says_the_weights_are_synthetic(tmp_path):
    empty_weights = tmp_path / "weights"
    empty_weights.mkdir()
    # every process the demo starts (its Ray: GCS, raylet, agents, replicas) inherits this
    marker = f"lipserve-demo-{uuid.uuid4().hex}"
    run = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--data", str(tmp_path / "data"), "--weights", str(empty_weights),
         "--port", str(free_port()), "--seconds", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TEST_PROCESS_MARKER": marker},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # only lipserve's own lines: none of Ray's warnings, progress or shutdown messages
    for noise in ("Token authentication", "(raylet)", "graceful_shutdown", "Started Serve", "is ready at",
                  "Traceback", "WARNING", "ERROR"):
        assert noise not in run.stdout + run.stderr, (noise, run.stdout[-2000:], run.stderr[-2000:])
    # its Ray is gone when it returns: the next test's Ray starts on a quiet machine
    assert processes_carrying(marker) == [], "the demo left Ray processes behind"
    assert "SYNTHETIC WEIGHTS" in run.stdout and "NOT meaningful" in run.stdout
    warnings = run.stdout.split("warnings:", 1)[1]  # the response's warnings, printed
    assert "Haar cascade" in warnings and "SYNTHETIC" in warnings
    for stage in ("tts", "faces", "voice", "lipsync"):
        assert f"  {stage} " in run.stdout
    output = tmp_path / "data" / "demo" / "astronaut-says.mp4"
    info = media.probe(output.read_bytes())
    assert info.has_audio and info.video_codec == "h264" and info.n_frames > 10
    names = sorted(p.name for p in (tmp_path / "data" / "demo").iterdir())
    assert names == ["astronaut-says.mp4", "astronaut.mp4"], f"only the source and the result, no temporary files: {names}"


def processes_carrying(marker: str) -> list[str]:
    """pid and command of every live process whose environment holds `marker`."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:120]!r}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
