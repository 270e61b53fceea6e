#!/usr/bin/env bash
# Install lipserve for a GPU machine: the one recipe used by cluster/Dockerfile and by a
# hand-made GPU VM. It installs what `make venv` installs (Makefile), with the CUDA torch build:
#   1. torch, pinned in requirements/cpu-torch.txt -- here taken from the CUDA wheel index
#      (torch==X matches the X+cuNNN build there), so CPU and GPU installs share one pin;
#   2. the dependencies pyproject.toml lists (read from it: there is no other list of packages);
#   3. the project itself (`pip install --no-deps -e .`).
# Steps 1+2 are `deps`, step 3 is `project`: the image installs them in separate layers, so a code
# change rebuilds only the small last one.
#
#   cluster/install.sh                  # all steps into .venv
#   cluster/install.sh deps             # steps 1 and 2 (the image's dependency layer)
#   cluster/install.sh project          # step 3 (the image's code layer)
#   cluster/install.sh requirements     # print step 2's list, nothing installed
#   EXTRAS=dev cluster/install.sh       # with the test tools, as `make test` has them
#
# The CUDA index: torch 2.13.0 is published for cu126, cu130 and cu132 (PyTorch's release
# compatibility matrix, RELEASE.md; there is no cu128 build since 2.12). cu126 is the default here:
# it runs on every NVIDIA driver from R525 on (CUDA 12 minor-version compatibility), which covers
# GKE's default drivers and the R570 Deep Learning VM images. cu130 needs a driver >= R580.
# cluster/README.md has the sources.
set -euo pipefail
cd "$(dirname "$0")/.."

STEP=${1:-all}
PY=${PY:-python3.11}
VENV=${VENV:-.venv}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu126}
EXTRAS=${EXTRAS:-}  # comma-separated optional-dependency groups of pyproject.toml, e.g. dev

requirements() {
  "$PY" - "$EXTRAS" <<'EOF'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    wanted += project["optional-dependencies"][extra]
print("\n".join(wanted))
EOF
}

deps() {
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/cpu-torch.txt --index-url "$TORCH_INDEX_URL"
  local listed
  listed=$(mktemp)
  requirements > "$listed"
  "$VENV/bin/python" -m pip install -q -r "$listed"
  rm -f "$listed"
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)"
}

project() {
  "$VENV/bin/python" -m pip install -q --no-deps -e .
}

case "$STEP" in
  all) deps; project ;;
  deps) deps ;;
  project) project ;;
  requirements) requirements ;;
  *) echo "usage: $0 [all|deps|project|requirements]" >&2; exit 2 ;;
esac
