"""Run every benchmark script in this folder, one after another, printing their figures.

Each benchmark runs the real architectures on SYNTHETIC weights on this machine's CPU (or a
GPU when present): the timings are real, the outputs are not meaningful.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failures = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n===== {script.name} =====", flush=True)
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        if rc != 0:
            print(f"{script.name} exited with {rc}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
