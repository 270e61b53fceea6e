"""Shared test set-up. Fixtures live in tests/fixtures/*, one module per area."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"
sys.path.insert(0, str(ROOT))

# Tests never reach the internet; keep torch from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# converted OpenVINO graphs (lipserve.fast) are reused across test runs of this checkout and by the
# Ray replicas the serve tests start (they inherit the environment)
os.environ.setdefault("LIPSERVE_FAST_CACHE_DIR", str(ROOT / ".pytest_cache" / "openvino"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE

pytest_plugins = [
    "tests.fixtures.gcs",
    "tests.fixtures.http_files",
    "tests.fixtures.lipsync_networks",
    "tests.fixtures.media",
    "tests.fixtures.voice_encoders",
    "tests.fixtures.tts",
    "tests.fixtures.voice",
    "tests.fixtures.ray",
    "tests.fixtures.storage_faults",
    "tests.fixtures.serve",
]


def pytest_terminal_summary(terminalreporter):
    """What the fault tests measured (recovery times and the like): figures, not assertions."""
    from tests.fixtures.serve import MEASURED

    if MEASURED:
        terminalreporter.section("lipserve under faults (measured on this machine)")
        for label, text in MEASURED.items():
            terminalreporter.write_line(f"{label}: {text}")
