"""What a model stage shares with the others: where its networks run and how.

`ModelRuntime` is built once per stage object from its `RuntimeSettings` and its replica's GPU
share: the device, the cap on its CUDA memory, the autocast dtype (kept only while the stage's
own precision check passes), the CPU threads and the fast graphs (lipserve.fast). `Stage` is what
a serving wrapper may rely on, so it never has to ask an object what it can do.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, Protocol, runtime_checkable

import torch

from .device import autocast_dtype, pick_device
from .gpu import cap_memory, memory_fraction
from .settings import RuntimeSettings

log = logging.getLogger("lipserve.runtime")

PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ModelRuntime:
    def __init__(self, settings: RuntimeSettings, gpu_share: float | None = None):
        """`gpu_share`: the replica's GPU fraction (Ray's num_gpus); caps CUDA memory (lipserve.gpu)."""
        self.settings = settings
        self.device = pick_device(settings.device)
        self.memory_cap = cap_memory(self.device, memory_fraction(settings.gpu_memory_fraction, gpu_share))
        self.autocast = autocast_dtype(self.device, settings.precision)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    @property
    def precision_name(self) -> str:
        return PRECISION_NAMES[self.autocast]

    def autocast_context(self):
        """torch.autocast in the kept dtype, or nothing (fp32)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def settle_autocast(self, stage: str, figures: str, within: bool, usable: bool = True,
                        keep_anyway: bool | None = None) -> bool:
        """Keep the autocast dtype when its measured gap to fp32 (`figures`) is `within` the stage's
        tolerance, or when precision was set explicitly (`keep_anyway`, by default: the setting is not
        auto) and the output is still `usable`; else fp32."""
        if keep_anyway is None:
            keep_anyway = self.settings.precision != "auto"
        if within:
            log.info("%s: %s: kept", stage, figures)
        elif keep_anyway and usable:
            log.warning("%s: %s: kept because precision was set explicitly", stage, figures)
        else:
            log.warning("%s: %s: using fp32", stage, figures)
            self.autocast = None
        return self.autocast is not None

    def fast(self, build: Callable, module: torch.nn.Module, backend: str):
        """(runner, report): one of lipserve.fast's builders for `module` on this device."""
        return build(module, backend, self.device, self.settings.cpu_threads(), self.settings.fast_cache_dir)


class OnRuntime:
    """A stage whose networks run on `self.runtime`: its device and autocast dtype are the runtime's."""

    runtime: ModelRuntime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def autocast(self) -> torch.dtype | None:
        return self.runtime.autocast

    @autocast.setter
    def autocast(self, dtype: torch.dtype | None) -> None:
        self.runtime.autocast = dtype


@runtime_checkable
class Stage(Protocol):
    """A stage object a serving wrapper holds (SpeechSynthesizer, VoiceConverter, LipSyncer)."""

    synthetic_weights: bool
    warm_up_report: dict | None

    @property
    def device(self) -> torch.device: ...

    def preload(self) -> None:
        """Load what the stage keeps lazy (idempotent)."""

    def warm_up(self, seconds: float | None = None) -> dict[str, float]:
        """Run every request path once on synthetic inputs; seconds per path."""

    def describe(self) -> dict: ...
