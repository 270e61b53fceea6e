"""One request, end to end: pre-flight, the two branches, lip sync, the atomic write, the response.

The orchestration is written once, in `orchestrate()`, against a small `Stages` interface:

* `LocalStages` runs the lipserve classes in this process (threads), for the CLI and tests;
* the Ray Serve ingress implements the same interface with handles to the stage deployments
  (deployments/stages.py).

So both paths validate the same way, overlap the same branches and build the same response.
The checks a request meets before the heavy work live in lipserve.checks; `build_response` and
the rest here are the pieces the ingress also calls directly. This module never imports Ray.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Callable, Protocol

from .contract import LipVideoRequest, LipVideoResponse
from .answer import SYNTHETIC_WARNING, Outcome, build_response, stage_engines
from .checks import check_speech, check_video, check_voice_source, load_given_speech, preflight
from .errors import Timeout
from .settings import Settings
from .timing import StageTimer

log = logging.getLogger("lipserve.pipeline")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# progress(stage, event, seconds): event is "start" or "end" (seconds is None on "start")
Progress = Callable[[str, str, "float | None"], None]
# send(piece): a streamed answer's next piece of fragmented MP4, awaited before the next is made
Send = Callable[[bytes], Awaitable[None]]


def new_request_id(given: str | None = None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a fresh one."""
    if given and _REQUEST_ID_RE.match(given):
        return given
    return uuid.uuid4().hex[:16]


def frames_for(fps: float, seconds: float) -> int:
    from . import media

    return media.frames_needed(fps, seconds)


@dataclass
class StageOutput:
    """A stage's result plus when it ran (unix seconds, measured where it ran)."""

    result: Any
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def timed_call(fn, *args, **kwargs) -> StageOutput:
    start = time.time()
    result = fn(*args, **kwargs)
    return StageOutput(result, start, time.time())


# ---------------------------------------------------------------- the orchestration, once

class Stages(Protocol):
    """How orchestrate() reaches the stages. Every call returns a StageOutput."""

    def languages(self) -> dict[str, list[str]] | None: ...
    def engines(self) -> dict[str, str]: ...
    async def read(self, fn, *args) -> Any: ...                                   # run blocking storage/probe work
    async def share(self, data: bytes) -> Any: ...                                # bytes -> token the stages accept
    async def synthesize(self, text: str, language: str, engine: str, seed: int | None) -> StageOutput: ...
    async def convert(self, audio, sample_rate: int, reference: Any, reference_is_video: bool,
                      deterministic: bool, seed: int | None) -> StageOutput: ...
    async def plan_faces(self, video: Any, options: dict, frames_needed: int | None) -> StageOutput: ...
    async def sync(self, video: Any, audio, sample_rate: int, options: dict, plan: Any) -> StageOutput: ...
    def sync_stream(self, video: Any, audio, sample_rate: int, options: dict,
                    plan: Any) -> AsyncIterator: ...                               # bytes..., then the SyncResult


async def orchestrate(request: LipVideoRequest, request_id: str, settings: Settings, storage, stages: Stages,
                      progress: Progress | None = None, label: str = "lipserve",
                      send: Send | None = None) -> LipVideoResponse:
    """Run one request. Raises LipserveError subclasses; writes the output only if all succeeded.

    With `send`, the answer is streamed: lip sync makes a fragmented MP4 and each piece is awaited
    through `send` as it is encoded; the output is still written once, whole, at the end."""
    timer = StageTimer(label)
    notify = progress or (lambda stage, event, seconds: None)

    def record(name: str, out: StageOutput) -> Any:
        timer.add(name, out.seconds, out.started)
        notify(name, "end", out.seconds)
        return out.result

    async def local_stage(name: str, fn, *args):
        notify(name, "start", None)
        out = await stages.read(timed_call, fn, *args)
        return record(name, out)

    async def remote_stage(name: str, call):
        notify(name, "start", None)
        return record(name, await call)

    pre = await stages.read(preflight, request, settings, storage, stages.languages())
    video = await local_stage("download", storage.read_bytes, request.user_video_gs)
    source = await local_stage("probe", check_video, video, settings)
    info = source.info
    check_voice_source(info, pre.reference_uri)
    reference, reference_is_video = None, True
    if pre.reference_uri:
        reference = await stages.read(storage.read_bytes, pre.reference_uri)
        reference_is_video = False
    # the stages get the SourceVideo with a token for its bytes: none hashes or probes it again
    video_token = source.with_data(await stages.share(video))
    reference_token = video_token if reference is None else await stages.share(reference)
    del video, reference, source  # the stages hold their own references from here on

    outcome = Outcome()
    # auto, static and track detect on frames spread over the ones the answer uses, so they wait for
    # the speech's length (then run beside voice conversion); a given box needs no frames at all
    after_speech = pre.lipsync["face_mode"] != "box"

    async def video_branch(frames_needed: int | None):
        return await remote_stage("faces", stages.plan_faces(video_token, pre.lipsync, frames_needed))

    async def audio_branch():
        seed = request.options.seed
        if pre.audio_uri:  # the caller's own speech; its fetch and decode are timed as the tts step
            speech = await local_stage("tts", load_given_speech, storage, pre.audio_uri, settings)
        else:
            speech = await remote_stage("tts", stages.synthesize(pre.text, pre.language, pre.engine, seed))
        speech_seconds = len(speech.audio) / float(speech.sample_rate)
        check_speech(speech_seconds, settings)
        voice = remote_stage("voice", stages.convert(speech.audio, speech.sample_rate, reference_token,
                                                     reference_is_video, request.options.deterministic_voice, seed))
        if not after_speech:
            return speech, await voice, None
        # the speech's length says which frames the answer uses
        voice, plan = await gather_or_cancel(voice, video_branch(frames_for(info.fps, speech_seconds)))
        return speech, voice, plan

    if after_speech:
        outcome.speech, outcome.voice, outcome.plan = await audio_branch()
    else:
        # a given box: validate it at once, beside the audio branch
        (outcome.speech, outcome.voice, _), outcome.plan = await gather_or_cancel(audio_branch(), video_branch(None))
    sync_called = timer.total()
    speech = (video_token, outcome.voice.audio, outcome.voice.sample_rate, pre.lipsync, outcome.plan)
    if send is None:
        outcome.sync = await remote_stage("lipsync", stages.sync(*speech))
    else:
        outcome.sync = await remote_stage("lipsync", sent_through(stages.sync_stream(*speech), send))
    # the stage's own clock from its start to the first frame (fragment), on this request's clock
    # (no skew between nodes)
    stage_timings = getattr(outcome.sync, "timings", None) or {}
    for step in ("first_frame", "first_fragment"):
        if stage_timings.get(step) is not None:
            setattr(outcome, step, sync_called + stage_timings[step])
    outcome.engines = stages.engines()
    await local_stage("upload", write_output, storage, request.output_video_gs, outcome.sync.mp4, pre.overwrite)
    response = build_response(request, request_id, timer, outcome, request.output_video_gs)
    timer.label = f"{label} {request_id}"
    timer.log_table(response.step_times)
    if response.synthetic_weights:
        log.warning("request %s: %s", request_id, SYNTHETIC_WARNING)
    return response


async def sent_through(pieces: AsyncIterator, send: Send) -> StageOutput:
    """A lip-sync stream: each piece of the file through `send`, the SyncResult with the whole file."""
    start, whole, result = time.time(), [], None
    async for item in pieces:
        if isinstance(item, (bytes, bytearray)):
            whole.append(bytes(item))
            await send(bytes(item))
        else:
            result = item
    if result is None:
        raise RuntimeError("the lip-sync stream ended without its result")
    result.mp4 = b"".join(whole)
    return StageOutput(result, start, time.time())


async def gather_or_cancel(*aws):
    """Run concurrently; the first failure propagates at once and the other branches are cancelled
    (a request with no face should not wait for voice conversion to fail)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def with_timeout(coro, seconds: float):
    """The whole-request limit: Timeout (504) when it runs out."""
    try:
        return await asyncio.wait_for(coro, timeout=seconds)
    except asyncio.TimeoutError:
        raise Timeout(f"the request did not finish within {seconds:g} s") from None


# ---------------------------------------------------------------- one process, no Ray

class LocalStages:
    """Stages as plain objects in this process; blocking work runs in worker threads so the
    video branch really overlaps the audio branch."""

    def __init__(self, tts, voice, lipsync):
        self.tts, self.voice, self.lipsync = tts, voice, lipsync
        self._languages = tts.languages()

    def languages(self):
        return self._languages

    def engines(self) -> dict[str, str]:
        return stage_engines(self.voice.describe(), self.lipsync.describe())

    async def read(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def share(self, data: bytes):
        return data

    async def synthesize(self, text, language, engine, seed):
        return await asyncio.to_thread(timed_call, self.tts.synthesize, text, language, engine, seed)

    async def convert(self, audio, sample_rate, reference, reference_is_video, deterministic, seed):
        return await asyncio.to_thread(timed_call, convert_voice, self.voice, audio, sample_rate, reference,
                                       reference_is_video, deterministic, seed)

    async def plan_faces(self, video, options, frames_needed):
        from .lipsync import LipSyncOptions

        return await asyncio.to_thread(timed_call, self.lipsync.plan_faces, video, LipSyncOptions(**options), frames_needed)

    async def sync(self, video, audio, sample_rate, options, plan):
        from .lipsync import LipSyncOptions

        return await asyncio.to_thread(timed_call, self.lipsync.sync, video, audio, sample_rate,
                                       LipSyncOptions(**options), plan)

    def sync_stream(self, video, audio, sample_rate, options, plan):
        from .lipsync import LipSyncOptions
        from .streaming import iterate_in_thread

        return iterate_in_thread(self.lipsync.sync_stream(video, audio, sample_rate, LipSyncOptions(**options), plan),
                                 "lipsync-stream")


def write_output(storage, uri: str, data: bytes, overwrite: bool) -> str:
    return storage.write_bytes(uri, data, overwrite=overwrite)


def convert_voice(voice, audio, sample_rate: int, reference: bytes, reference_is_video: bool, deterministic: bool,
                  seed: int | None = None):
    """Reference voice from the source video (or a separate file), then FreeVC. NoVoiceFound 422."""
    ref = voice.reference_from_video(reference) if reference_is_video else voice.reference_from_audio(reference)
    return voice.convert(audio, sample_rate, ref, deterministic=deterministic, seed=seed)


class Pipeline:
    """The whole request in one process (no Ray): for the CLI, tests and people without a cluster.

    With `settings.runtime.warmup` (or `warm_up=True`) every stage is warmed up here, before the first
    request (see lipserve.warmup). A caller that makes one request and exits (the CLI) passes
    `warm_up=False`: the warm-up would only add its own time to that one request's."""

    def __init__(self, settings: Settings, *, storage=None, tts=None, voice=None, lipsync=None,
                 warm_up: bool | None = None):
        self.settings = settings
        if storage is None:
            from .storage import Storage

            storage = Storage(settings)
        if tts is None:
            from .tts import SpeechSynthesizer

            tts = SpeechSynthesizer(settings)
        if voice is None:
            from .voice import VoiceConverter

            voice = VoiceConverter(settings)
        if lipsync is None:
            from .lipsync import LipSyncer

            lipsync = LipSyncer(settings)
        self.storage = storage
        self.stages = LocalStages(tts, voice, lipsync)
        self.warm_up_report: dict[str, dict[str, float]] | None = None
        if settings.runtime.warmup if warm_up is None else warm_up:
            self.warm_up()

    def warm_up(self) -> dict[str, dict[str, float]]:
        """Warm every stage that can be (its `warm_up()`), sharing one synthetic clip; stage ->
        {path: seconds}, plus "seconds" per stage. The stages warm side by side, as a request runs
        its two branches side by side."""
        from concurrent.futures import ThreadPoolExecutor

        from .warmup import warmup_inputs

        inputs = warmup_inputs(self.settings.runtime.warmup_seconds)
        stages = {name: stage for name, stage in (("tts", self.stages.tts), ("voice", self.stages.voice),
                                                  ("lipsync", self.stages.lipsync))
                  if hasattr(stage, "warm_up")}

        def warm(name: str):
            start = time.perf_counter()
            report = stages[name].warm_up(inputs=inputs)
            return {**report, "seconds": round(time.perf_counter() - start, 4)}

        with ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="warm-up") as pool:
            futures = {name: pool.submit(warm, name) for name in stages}
            self.warm_up_report = {name: future.result() for name, future in futures.items()}
        log.info("warm-up: %s", ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in self.warm_up_report.items()))
        return self.warm_up_report

    def run(self, request: LipVideoRequest, request_id: str | None = None, progress: Progress | None = None,
            on_piece: Callable[[bytes], None] | None = None) -> LipVideoResponse:
        """One request. `on_piece`: stream the answer, each fragmented-MP4 piece handed over as it is
        encoded (the output is still written whole at the end, only if the request succeeds)."""
        rid = new_request_id(request_id)

        async def send(piece: bytes) -> None:
            on_piece(piece)

        coro = orchestrate(request, rid, self.settings, self.storage, self.stages, progress,
                           label="lipserve (one process)", send=send if on_piece is not None else None)
        return asyncio.run(with_timeout(coro, self.settings.serving.request_timeout_s))
