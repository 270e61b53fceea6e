"""What every stage replica shares: settings, load-once, health, reconfigure, timing + metrics.

A stage deployment is a thin wrapper: it builds one lipserve object in its constructor (models
load once per replica), runs its calls in a worker thread (so health checks are answered while a
long call runs), and records each call's latency and failures. No model math here.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import ray

from lipserve.errors import LipserveError, ModelNotLoaded
from lipserve.logs import configure_logging
from lipserve.pipeline import StageOutput
from lipserve.settings import Settings

from .metrics import stage_metrics

log = logging.getLogger("lipserve.deployments")


def replica_settings(overrides: dict | None = None) -> Settings:
    """Settings inside a replica: LIPSERVE_* env vars (runtime_env) under user_config overrides."""
    return Settings(**(overrides or {}))


def apply_log_level(config: dict) -> None:
    level = str(config.get("log_level", "INFO")).upper()
    configure_logging(getattr(logging, level, logging.INFO))


@dataclass
class SharedBytes:
    """Bytes put into Ray's object store once (by the ingress); stages fetch them from there.

    The ObjectRef is wrapped so that Serve passes it through as a reference and each stage
    decides when to fetch (from the node's shared memory, not from storage)."""

    ref: Any  # ray.ObjectRef[bytes]
    size: int

    async def get(self) -> bytes:
        return await self.ref


async def resolve(data) -> bytes:
    return await data.get() if isinstance(data, SharedBytes) else data


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, LipserveError) else "internal"


class StageReplica:
    """Base of the three stage deployments. Subclasses set `stage` and implement `build()`."""

    stage = "stage"

    def __init__(self):
        configure_logging()
        self.settings = replica_settings()
        self.overrides: dict = {}  # the user_config settings in force
        self.worker = None
        self.worker = self.build(self.settings)
        self.metrics = stage_metrics()
        self.loaded_at = time.time()
        self.in_flight: Counter[str] = Counter()  # step -> calls running in this replica now

    def build(self, settings: Settings):  # pragma: no cover - abstract
        raise NotImplementedError

    def reconfigure(self, config: dict) -> None:
        """user_config: {"log_level": "INFO", "settings": {<Settings field>: value}}.

        A change of settings rebuilds the stage object (models reload) only when they differ."""
        config = config or {}
        apply_log_level(config)
        new = replica_settings(config.get("settings"))
        if new != self.settings:
            log.info("%s: settings changed, reloading", self.stage)
            self.worker = self.build(new)
            self.settings = new
        self.overrides = dict(config.get("settings") or {})

    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy (it is replaced)."""
        if self.worker is None:
            raise ModelNotLoaded(f"{self.stage}: model not loaded")
        device = getattr(self.worker, "device", None)
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ModelNotLoaded(f"{self.stage}: CUDA device lost")

    def describe_stage(self) -> dict:
        desc = dict(self.worker.describe()) if self.worker is not None else {}
        device = getattr(self.worker, "device", None)
        desc.update({
            "up": self.worker is not None,
            "model_loaded": self.worker is not None,
            "device": str(device) if device is not None else "cpu",
            "synthetic": bool(getattr(self.worker, "synthetic_weights", False)),
            "replica_pid": os.getpid(),
            "gpu_ids": _gpu_ids(),  # what Ray assigned (logical on a CPU box; torch may still see none)
            "in_flight": {step: n for step, n in self.in_flight.items() if n},
            "settings_overrides": self.overrides,
        })
        return desc

    async def describe(self) -> dict:
        return self.describe_stage()

    async def warm(self) -> dict:
        """Models load in the constructor; this loads anything the stage keeps lazy (its
        `preload()`, if it has one) and proves the replica answers. Idempotent."""
        self.check_health()
        if hasattr(self.worker, "preload"):
            await asyncio.to_thread(self.worker.preload)
        return self.describe_stage()

    async def run_timed(self, stage: str, engine_of: Callable[[Any], str], fn, *args, **kwargs) -> StageOutput:
        """Run fn in a worker thread; return its result with start/end stamps; record metrics."""
        start, t0 = time.time(), time.perf_counter()
        self.in_flight[stage] += 1
        try:
            result = await asyncio.to_thread(fn, *args, **kwargs)
        except BaseException as exc:
            self.metrics.failed(stage, error_code(exc))
            raise
        finally:
            self.in_flight[stage] -= 1
        seconds = time.perf_counter() - t0
        self.metrics.observe(stage, engine_of(result), seconds)
        return StageOutput(result, start, start + seconds)


def _gpu_ids() -> list[str]:
    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def put_bytes(data: bytes) -> SharedBytes:
    return SharedBytes(ray.put(data), len(data))
