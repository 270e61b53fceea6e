"""What every stage replica shares: settings, load-once, health, reconfigure, timing + metrics.

A stage deployment is a thin wrapper: it builds one lipserve object in its constructor (models
load once per replica), runs its calls in a worker thread (so health checks are answered while a
long call runs), and records each call's latency and failures. No model math here.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import ray

from lipserve.errors import LipserveError, ModelNotLoaded
from lipserve.logs import configure_logging
from lipserve.media import SourceVideo
from lipserve.pipeline import StageOutput
from lipserve.runtime import Stage
from lipserve.settings import Settings, split_by_section

from .metrics import stage_metrics

log = logging.getLogger("lipserve.deployments")


def initial_user_config() -> dict:
    """The user_config Serve will hand to reconfigure() right after the constructor ({} when there
    is none, or outside a replica). The constructor loads the models with the settings it gives,
    so a user_config that changes settings does not load every model twice (env settings first,
    then the user_config's). Read from the replica context's deployment config, which Serve sets
    before the constructor runs (a private field in Ray 2.60: without it, the models load with
    the env settings and reconfigure() reloads them as before)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:  # not inside a Serve replica
        return {}
    config = getattr(getattr(context, "_deployment_config", None), "user_config", None)
    return dict(config) if isinstance(config, dict) else {}


def replica_settings(overrides: dict | None = None, owns: tuple[str, ...] = (), deployment: str = "") -> Settings:
    """Settings inside a replica: LIPSERVE_* env vars (runtime_env) under its user_config's
    `settings`, which may only name keys of the sections this deployment reads (`owns`): a key
    another deployment reads would change nothing here, so it is refused rather than ignored."""
    overrides = dict(overrides or {})
    if owns:
        foreign = {key: section for section, keys in split_by_section(overrides).items() if section not in owns
                   for key in keys}
        if foreign:
            where = ", ".join(f"{key} (read by the {section} section)" for key, section in sorted(foreign.items()))
            raise ValueError(f"{deployment}: user_config.settings sets {where}; this deployment reads only the "
                             f"{', '.join(owns)} settings. Move the line under the deployment that reads it.")
    return Settings(**overrides)


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


async def resolve(data):
    """The bytes behind a SharedBytes (also inside a SourceVideo); anything else as given."""
    if isinstance(data, SourceVideo):
        return data.with_data(await resolve(data.data))
    return await data.get() if isinstance(data, SharedBytes) else data


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, LipserveError) else "internal"


class StageReplica:
    """Base of the three stage deployments. Subclasses set `stage`, `owns`, `stage_module` and
    `stage_class` (the lipserve class build() makes), or override `build()`.

    A replica is ready for traffic once its constructor returns: the models are loaded and, with
    settings.runtime.warmup, every request path has run once (the stage's `warm_up()`), so its first
    request is as fast as its tenth. `start_seconds` says where its start went."""

    stage = "stage"
    stage_module = ""
    owns: tuple[str, ...] = ()  # the settings sections its build() reads; its user_config may set only these
    stage_class = ""  # the class in stage_module that build() makes
    start_seconds: dict[str, float] = {}  # replaced (never mutated) by load()

    def __init__(self):
        configure_logging()
        user_config = initial_user_config()
        if user_config:
            apply_log_level(user_config)
        self.settings = replica_settings(user_config.get("settings"), self.owns, self.stage)
        self.overrides: dict = dict(user_config.get("settings") or {})  # the user_config settings in force
        self.worker = None
        self.worker = self.load(self.settings)
        self.metrics = stage_metrics()
        self.loaded_at = time.time()
        self.in_flight: Counter[str] = Counter()  # step -> calls running in this replica now

    def build(self, settings: Settings):
        """The stage object: `stage_module`'s `stage_class`, given the settings and this replica's GPU share."""
        stage_class = getattr(importlib.import_module(self.stage_module), self.stage_class)
        return stage_class(settings, gpu_share=replica_gpu_share())

    def load(self, settings: Settings):
        """build() the stage object, then (settings.runtime.warmup) warm it up; returns it. Times the
        import of the stage's module, the build (checkpoints or synthetic weights) and the warm-up."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if self.stage_module:
            importlib.import_module(self.stage_module)  # torch, librosa, ...: the replica's heavy imports
        timings["import"] = time.perf_counter() - start
        start = time.perf_counter()
        worker = self.build(settings)
        timings["build"] = time.perf_counter() - start
        if not isinstance(worker, Stage):
            raise TypeError(f"{self.stage}: {type(worker).__name__} is not a lipserve.runtime.Stage")
        if settings.runtime.warmup:
            start = time.perf_counter()
            worker.warm_up(seconds=settings.runtime.warmup_seconds)
            timings["warm_up"] = time.perf_counter() - start
        self.start_seconds = {k: round(v, 3) for k, v in timings.items()}
        log.info("%s: replica ready in %.1f s (%s)", self.stage, sum(timings.values()),
                 ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return worker

    def reconfigure(self, config: dict) -> None:
        """user_config: {"log_level": "INFO", "settings": {<Settings field>: value}}.

        A change of settings rebuilds the stage object (models reload) only when they differ."""
        config = config or {}
        apply_log_level(config)
        new = replica_settings(config.get("settings"), self.owns, self.stage)
        if new != self.settings:
            log.info("%s: settings changed, reloading", self.stage)
            self.worker = self.load(new)
            self.settings = new
        self.overrides = dict(config.get("settings") or {})

    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy (it is replaced)."""
        if self.worker is None:
            raise ModelNotLoaded(f"{self.stage}: model not loaded")
        if self.worker.device.type == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ModelNotLoaded(f"{self.stage}: CUDA device lost")

    def describe_stage(self) -> dict:
        desc = dict(self.worker.describe()) if self.worker is not None else {}
        desc.update({
            "up": self.worker is not None,
            "model_loaded": self.worker is not None,
            "device": str(self.worker.device) if self.worker is not None else "cpu",
            "synthetic": bool(self.worker is not None and self.worker.synthetic_weights),
            "replica_pid": _pid(),
            "replica_id": _replica_id(),
            "gpu_ids": _gpu_ids(),  # what Ray assigned (logical on a CPU box; torch may still see none)
            "gpu_share": replica_gpu_share(),  # this replica's num_gpus; its CUDA memory is capped at it
            "start_seconds": dict(self.start_seconds),
            "warmed_up": bool(self.worker is not None and self.worker.warm_up_report),
            "in_flight": {step: n for step, n in self.in_flight.items() if n},
            "settings_overrides": self.overrides,
        })
        return desc

    async def describe(self) -> dict:
        return self.describe_stage()

    async def warm(self) -> dict:
        """Models load in the constructor; this loads anything the stage keeps lazy (its
        `preload()`, if it has one), runs the warm-up when the replica started without it
        (LIPSERVE_WARMUP=0), and proves the replica answers. Idempotent."""
        self.check_health()
        await asyncio.to_thread(self.worker.preload)
        if not self.worker.warm_up_report:
            start = time.perf_counter()
            await asyncio.to_thread(self.worker.warm_up, seconds=self.settings.runtime.warmup_seconds)
            self.start_seconds = {**self.start_seconds, "warm_up": round(time.perf_counter() - start, 3)}
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


    async def stream_timed(self, stage: str, engine: str, items):
        """Pass on what the blocking generator `items` yields, made on a thread of its own; the
        whole stream's latency is recorded under `stage` (e.g. lipsync_stream) and a failure counted."""
        from lipserve.streaming import iterate_in_thread

        t0 = time.perf_counter()
        self.in_flight[stage] += 1
        try:
            async for item in iterate_in_thread(items, stage):
                yield item
        except BaseException as exc:
            self.metrics.failed(stage, error_code(exc))
            raise
        finally:
            self.in_flight[stage] -= 1
        self.metrics.observe(stage, engine, time.perf_counter() - t0)


def _pid() -> int:
    import os

    return os.getpid()


def replica_gpu_share() -> float | None:
    """This replica's GPU fraction as Ray assigned it (its num_gpus), None outside Ray or with none.
    The stages cap their CUDA memory at it (lipserve.gpu): Ray does not isolate fractional GPUs."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver (a test, a script), not a replica
        return None
    share = context.get_assigned_resources().get("GPU")
    return float(share) if share else None


def _replica_id() -> str | None:
    """Serve's id of this replica (as in the `replica` tag of its metrics); None outside Serve."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_tag
    except RayServeException:
        return None


def _gpu_ids() -> list[str]:
    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def put_bytes(data: bytes) -> SharedBytes:
    return SharedBytes(ray.put(data), len(data))
