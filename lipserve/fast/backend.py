"""Which execution a network gets: the fp32 eager module, or its fast OpenVINO graph.

Per network the setting is `auto`, `eager` or `openvino`:

* `eager`: the torch module as loaded (the path the golden tests prove);
* `openvino`: the fast graph, kept even when its load-time check misses the bound (with a warning);
* `auto` (default): the fast graph only on a CPU device, only when the `openvino` package is
  installed (the optional `fast` extra), and only while the load-time check holds its bound;
  otherwise eager, with the reason logged.

The load-time check runs one fixed input through both paths with the loaded weights and
compares them with the network's bound (networks.BOUNDS), so a checkpoint the fast path handles
worse than the synthetic weights the tests use is caught where it is loaded.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

log = logging.getLogger("lipserve.fast")

BACKENDS = ("auto", "eager", "openvino")


@dataclass
class FastPathReport:
    """What was chosen for one network and why (describe() and /api/v1/models show it)."""

    network: str
    backend: str            # "eager" | "openvino"
    reason: str
    metric: str = ""        # the bound's measure, e.g. "min frame cosine"
    measured: float | None = None
    bound: float | None = None
    build_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(choice: str, device: torch.device | str, network: str) -> tuple[str, str]:
    """(backend to try, reason) before any check: what the setting asks for on this device."""
    if choice not in BACKENDS:
        raise ValueError(f"{network} backend must be one of {', '.join(BACKENDS)}, not {choice!r}")
    device = torch.device(device)
    if choice == "eager":
        return "eager", "set to eager"
    if device.type != "cpu":
        # the OpenVINO graph here is a CPU graph; on CUDA the eager module (with autocast) is the fast one
        return "eager", f"the fast path is CPU-only and the device is {device.type}"
    if not openvino_installed():
        if choice == "openvino":
            raise RuntimeError(f"{network} backend 'openvino' needs the openvino package "
                               "(pip install 'lipserve[fast]')")
        return "eager", "openvino is not installed (pip install 'lipserve[fast]')"
    return "openvino", "auto: CPU with openvino installed" if choice == "auto" else "set to openvino"


def choose(network: str, choice: str, device: torch.device | str, eager, build: Callable[[], object],
           check: Callable[[object], tuple[str, float, float, bool]]):
    """(runner, FastPathReport): `eager` itself, or `build()`'s fast runner when the policy and the check allow.

    `check(fast)` returns (metric name, measured, bound, within bound).
    """
    backend, reason = resolve_backend(choice, device, network)
    if backend == "eager":
        log.info("%s: eager fp32 (%s)", network, reason)
        return eager, FastPathReport(network, "eager", reason)
    start = time.perf_counter()
    fast = build()
    metric, measured, bound, ok = check(fast)
    seconds = time.perf_counter() - start
    report = FastPathReport(network, "openvino", reason, metric, float(measured), float(bound), round(seconds, 2))
    if ok:
        log.info("%s: OpenVINO fp32 graph, %s %.6g (bound %.6g), built and checked in %.1f s",
                 network, metric, measured, bound, seconds)
        return fast, report
    if choice == "openvino":
        log.warning("%s: OpenVINO graph misses its bound (%s %.6g, bound %.6g); kept because the backend was set "
                    "explicitly", network, metric, measured, bound)
        report.reason += f"; kept although {metric} {measured:.6g} misses the bound {bound:.6g}"
        return fast, report
    log.warning("%s: OpenVINO graph misses its bound with these weights (%s %.6g, bound %.6g); using eager fp32",
                network, metric, measured, bound)
    return eager, FastPathReport(network, "eager", f"fast path missed its bound ({metric} {measured:.6g}, "
                                                   f"bound {bound:.6g})", metric, float(measured), float(bound),
                                 round(seconds, 2))
