"""A torch module as a compiled OpenVINO graph for the CPU, in float32.

Build: torch.jit.trace with example inputs (all dimensions stay dynamic in the converted model,
so one graph serves every batch size and length), `openvino.convert_model`, then
`compile_model` for the CPU with the inference precision pinned to f32. Without that pin the
CPU plugin picks bf16 on CPUs that have it (AVX512-BF16, AMX), which would silently leave
the bounds this package is proven to.

Conversion costs tens of seconds for WavLM-Large, so the converted model is kept on disk
(IR xml + bin, weights stored as float32, not the fp16 `save_model` defaults to), keyed by
a hash of the module's weights, the example input ranks and the torch/OpenVINO versions.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("lipserve.fast")

# bump when the traced wrappers change in a way that changes the graph
GRAPH_FORMAT = 2  # 2: WavLM and the synthesizer take their real lengths (padded inputs)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """blake2b of every state_dict entry's name, dtype, shape and bytes (1.2 GB of WavLM in ~1 s)."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().reshape(-1).view(np.uint8))
    return h.hexdigest()


def _cache_key(name: str, fingerprint: str, examples: Sequence[torch.Tensor]) -> str:
    import openvino

    parts = [name, fingerprint, str(GRAPH_FORMAT), torch.__version__, openvino.__version__,
             ",".join(f"{t.dim()}:{t.dtype}" for t in examples)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _convert(module: torch.nn.Module, examples: tuple[torch.Tensor, ...]):
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        # shape checks in Python (e.g. "too short for one frame") are evaluated once while tracing, which
        # is what we want: the graph serves inputs that passed them in the eager wrapper code
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit.trace is deprecated in favour of torch.export, which OpenVINO also reads; the trace is
        # kept while it is the path that converts all four networks with dynamic shapes (checked by tests)
        warnings.simplefilter("ignore", DeprecationWarning)
        # check_trace off: the weight-norm layers cache their product after the first call, so a
        # second trace differs in how it reaches the same constant weights
        traced = torch.jit.trace(module, examples, check_trace=False)
        return ov.convert_model(traced, example_input=examples)


def load_or_convert(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], name: str,
                    cache_dir: Path | None):
    """The OpenVINO model for `module`, from the disk cache when a matching one is there."""
    import openvino as ov

    if cache_dir is None:
        return _convert(module, examples), False
    cache_dir = Path(cache_dir).expanduser()
    key = _cache_key(name, weights_fingerprint(module), examples)
    folder = cache_dir / f"{name}-{key}"
    xml = folder / "model.xml"
    if xml.is_file() and (folder / "model.bin").is_file():
        return ov.Core().read_model(str(xml)), True
    model = _convert(module, examples)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
        try:
            os.replace(staging, folder)  # atomic: readers see a whole folder or none
        except OSError:  # another process stored the same key first; theirs is as good
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:  # a read-only or full disk costs the next start a conversion, nothing more
        log.warning("could not store the %s graph in %s: %s", name, cache_dir, exc)
    return model, False


class CompiledGraph:
    """Calls a compiled OpenVINO model with numpy/torch inputs; returns float32 numpy outputs.

    One infer request, used under a lock: a replica runs one forward of a network at a time
    anyway, and a second request would double the activation memory.

    `shape_cache_entries`: how many shape-specific kernels the CPU plugin keeps (its runtime
    cache; None leaves its default of 5000). A graph whose input shape changes with every
    request (speech length, frame size) should pass 0: otherwise each new length adds kernels
    that are never used again, and the process grows by ~18 MiB per conversion (WavLM-Large and
    the synthesizer, measured) until the cache is full. With 0 the kernels are made per call,
    which cost nothing measurable here (40 conversions 64 s against 68 s; Wav2Lip 8.75 s
    against 8.58 s for 12 batches).
    """

    def __init__(self, module: torch.nn.Module, examples: tuple[torch.Tensor, ...], *, name: str,
                 threads: int, cache_dir: Path | None, shape_cache_entries: int | None = None):
        import openvino as ov

        self.name = name
        model, self.from_cache = load_or_convert(module, examples, name, cache_dir)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": max(1, int(threads)),
            # no pinning: the cores are shared with torch ops, the video encoder and other replicas
            "ENABLE_CPU_PINNING": False,
        }
        if shape_cache_entries is not None:
            config["CPU_RUNTIME_CACHE_CAPACITY"] = int(shape_cache_entries)
        self.config = config  # as given (the compiled model does not report the cache capacity back)
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.n_outputs = len(self.compiled.outputs)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, *inputs) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                                       dtype=np.float32) for x in inputs]
        with self._lock:
            self._request.infer(arrays)
            # the request reuses its output buffers on the next call: copy out under the lock
            return [self._request.get_output_tensor(i).data.copy() for i in range(self.n_outputs)]
