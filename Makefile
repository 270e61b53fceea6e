# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast sysdeps-test sysdeps-test-fast sysdeps-demo bench gpu-wheels gpu-check-cpu clean

# Debian packages each command needs (tools/sysdeps.sh installs the missing ones as root with
# apt-get, else says how). chromium + chromium-driver: the try-it page's real-browser test;
# espeak-ng: the second voice of the real speaker-encoder test and the espeak engine's tests.
# redis-server: the GCS store of the multi-node head-loss test (issue #24; the test starts its own
# instance on a free loopback port). The demo needs none: its voice is piper's, from pip.
TEST_SYSTEM_PACKAGES := espeak-ng chromium chromium-driver redis-server
TEST_FAST_SYSTEM_PACKAGES := espeak-ng
DEMO_SYSTEM_PACKAGES :=

# Create/refresh the venv. The CPU torch wheel is installed first (pinned in
# requirements/cpu-torch.txt) so the project's torch range never pulls a CUDA build.
$(STAMP): pyproject.toml requirements/cpu-torch.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/cpu-torch.txt
	$(VPY) -m pip install -q -e '.[dev,fast]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps-test:
	@tools/sysdeps.sh $(TEST_SYSTEM_PACKAGES)
sysdeps-test-fast:
	@tools/sysdeps.sh $(TEST_FAST_SYSTEM_PACKAGES)
sysdeps-demo:
	@tools/sysdeps.sh $(DEMO_SYSTEM_PACKAGES)

demo: sysdeps-demo $(STAMP)
	$(VPY) -m devtools.demo

test: sysdeps-test $(STAMP)
	$(VPY) -m pytest -q tests

# the inner loop: no Ray, nothing slow (the browser test is a Ray test, so no chromium here)
test-fast: sysdeps-test-fast $(STAMP)
	$(VPY) -m pytest -q -m "not ray and not slow" tests

bench: $(STAMP)
	$(VPY) benchmarks/run_all.py

# The one-shot GPU check (benchmarks/gpu/README.md): the py3.12 manylinux wheels it needs on a GPU box
# without internet, and its inputs, into the ignored .whl/ (carry it; under 64 MiB with the repo).
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels: $(STAMP)
	rm -f .whl/*.whl
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl -r benchmarks/gpu/wheels.txt
	$(VPY) benchmarks/gpu/make_inputs.py --out .whl/inputs
	$(VPY) benchmarks/gpu/wheels.py .whl

# The same check on this machine's CPU, small (what CI runs through tests/test_gpu_check.py).
gpu-check-cpu: $(STAMP)
	benchmarks/gpu/run.sh --device cpu --quick --out out/gpu-check-cpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
