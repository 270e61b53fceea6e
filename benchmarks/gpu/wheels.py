"""Sizes of what the device check carries (.whl/): every wheel and input file, and the total.

Usage: python benchmarks/gpu/wheels.py .whl     (make gpu-wheels runs it)
Exits 1 when a wheel of wheels.txt is missing, when two versions of one project are there (pip
would refuse the install), or when the carried files and the tracked repository together pass
the 64 MiB a lent GPU box accepts.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 2**20
ROOT = Path(__file__).resolve().parents[2]


def pinned() -> dict[str, str]:
    """{normalised project name: version} from wheels.txt."""
    out = {}
    for line in (Path(__file__).parent / "wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "_", name).lower()] = version
    return out


def main(folder: str) -> int:
    carried = Path(folder)
    wheels = sorted(carried.glob("*.whl"))
    found: dict[str, list[str]] = {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        found.setdefault(re.sub(r"[-_.]+", "_", name).lower(), []).append(version)
    problems = [f"missing: {n}=={v}" for n, v in pinned().items() if v not in found.get(n, [])]
    problems += [f"two versions of {n}: {vs}" for n, vs in found.items() if len(vs) > 1]
    files = wheels + sorted(p for p in (carried / "inputs").glob("*") if p.is_file())
    width = max(len(p.name) for p in files) if files else 10
    for path in files:
        print(f"{path.name:<{width}}  {path.stat().st_size / 2**20:8.2f} MiB")
    carried_bytes = sum(p.stat().st_size for p in files)
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    repo_bytes = sum((ROOT / p).stat().st_size for p in tracked.decode().split("\0") if p and (ROOT / p).is_file())
    print(f"{'wheels':<{width}}  {sum(p.stat().st_size for p in wheels) / 2**20:8.2f} MiB ({len(wheels)} files)")
    print(f"{'carried in all':<{width}}  {carried_bytes / 2**20:8.2f} MiB")
    print(f"{'+ tracked repo':<{width}}  {(carried_bytes + repo_bytes) / 2**20:8.2f} MiB of {LIMIT / 2**20:.0f} MiB")
    if carried_bytes + repo_bytes > LIMIT:
        problems.append("over the 64 MiB a lent box accepts")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
