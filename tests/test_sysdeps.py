"""tools/sysdeps.sh, which `make test`, `make test-fast` and `make demo` run first: silent when the
system packages are there, and a clear stop when they are missing and cannot be installed.
Its overrides keep it from ever calling apt-get here."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "sysdeps.sh"
PACKAGES = ["espeak-ng", "chromium", "chromium-driver"]


def run_sysdeps(lookup_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSDEPS_PATH": str(lookup_dir), "SYSDEPS_APT": "/nonexistent/apt-get"}
    return subprocess.run([str(SCRIPT), *PACKAGES], env=env, capture_output=True, text=True, timeout=10)


def test_missing_packages_without_apt_stop_with_the_install_command(tmp_path):
    run = run_sysdeps(tmp_path)  # an empty folder: none of the commands is found
    assert run.returncode != 0
    assert run.stdout == ""
    assert "sudo apt-get install espeak-ng chromium chromium-driver" in run.stderr
    assert "missing system packages espeak-ng chromium chromium-driver" in run.stderr
    assert "chromedriver" in run.stderr  # the command chromium-driver provides, named too


def test_only_the_missing_package_is_named(tmp_path):
    for command in ("espeak-ng", "chromium"):
        (tmp_path / command).write_text("#!/bin/sh\n")
        (tmp_path / command).chmod(0o755)
    run = run_sysdeps(tmp_path)
    assert run.returncode != 0
    assert "sudo apt-get install chromium-driver\n" in run.stderr


def test_all_present_is_silent(tmp_path):
    for command in ("espeak-ng", "chromium", "chromedriver"):
        (tmp_path / command).write_text("#!/bin/sh\n")
        (tmp_path / command).chmod(0o755)
    run = run_sysdeps(tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
