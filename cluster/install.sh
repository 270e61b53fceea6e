#!/usr/bin/env bash
# Install lipserve for a GPU machine: the one recipe used by cluster/Dockerfile and by a
# hand-made GPU VM. It runs the same two pip steps as `make venv` (Makefile):
#   1. torch, pinned in requirements/cpu-torch.txt -- here taken from the CUDA wheel index
#      (torch==X matches the X+cuNNN build there), so CPU and GPU installs share one pin;
#   2. the project itself (`pip install -e .`), whose pyproject.toml lists every other dependency.
# There is deliberately no other list of packages here.
#
#   VENV=.venv PY=python3.11 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 cluster/install.sh
#   EXTRAS='.[dev]' cluster/install.sh      # with the test tools, as `make test` has them
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3.11}
VENV=${VENV:-.venv}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
EXTRAS=${EXTRAS:-.}

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements/cpu-torch.txt --index-url "$TORCH_INDEX_URL"
"$VENV/bin/python" -m pip install -q -e "$EXTRAS"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)"
