"""Fast CPU execution of the four networks, each proven against the fp32 eager path.

Why OpenVINO: measured side by side on the 2-core AVX2 EPYC box (docs/FAST_PATHS.md has the
table), an fp32 graph run by OpenVINO's CPU plugin beat every other candidate on every network
(eager fp32 with channels-last, a frozen TorchScript graph, ONNX Runtime fp32, int8 dynamic
quantisation in torch and in ONNX Runtime) while staying at float32 rounding distance from the
eager output. int8 was either slower on this CPU (no VNNI) or off by more than the bounds.

The eager module stays the reference: it is what the golden tests test, what runs on CUDA, and
what a backend falls back to when OpenVINO is not installed or its load-time check misses a bound.

* `backend.py`  choosing a backend per network from the settings, the load-time bound check
* `openvino_graph.py`  trace -> OpenVINO model -> compiled fp32 graph (with an on-disk cache)
* `networks.py`  the per-network wrappers and their bounds
"""
from .backend import BACKENDS, FastPathReport, resolve_backend
from .networks import (BOUNDS, FastS3FD, FastSynthesizer, FastWav2Lip, FastWavLM, fast_s3fd, fast_synthesizer,
                       fast_wav2lip, fast_wavlm)

__all__ = ["BACKENDS", "BOUNDS", "FastPathReport", "FastS3FD", "FastSynthesizer", "FastWav2Lip", "FastWavLM",
           "fast_s3fd", "fast_synthesizer", "fast_wav2lip", "fast_wavlm", "resolve_backend"]
