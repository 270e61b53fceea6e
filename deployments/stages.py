"""The stages as the ingress reaches them: lipserve.pipeline.Stages over Serve handles.

Every call to a stage goes through `from_stage`, so a replica that dies while it holds one is
answered the same way wherever it happens: 503 `stage_unavailable` naming the stage.
"""
from __future__ import annotations

import asyncio

from lipserve.answer import stage_engines

from .common import put_bytes
from .errors import STAGE_LOST, stage_lost

STAGE_INFO_TIMEOUT_S = 15.0


async def from_stage(deployment: str, step: str, response):
    """Await a stage call; a replica that died holding it becomes StageUnavailable (503)."""
    try:
        return await response
    except STAGE_LOST as exc:
        raise stage_lost(deployment, exc, step) from exc


class RemoteStages:
    """The three stage handles, and what the ingress asks of them once (languages, engines)."""

    def __init__(self, speech, voice, lipsync):
        self.speech, self.voice, self.lipsync = speech, voice, lipsync
        # the labels /health reports under, and the deployments behind them
        self.deployment_of = {"tts": speech.deployment_name, "voice": voice.deployment_name,
                              "lipsync": lipsync.deployment_name}
        self.stage_languages: dict[str, list[str]] | None = None  # engine -> languages
        self.stage_engines: dict[str, str] = {}

    async def load_info(self) -> None:
        """Languages and engines, asked of the stages once (they do not change without a redeploy)."""
        if self.stage_languages is None:
            self.stage_languages = await from_stage("SpeechSynthesizer", "languages", self.speech.languages.remote())
        if not self.stage_engines:
            voice_desc, lip_desc = await asyncio.gather(from_stage("VoiceConverter", "describe",
                                                                   self.voice.describe.remote()),
                                                        from_stage("LipSyncer", "describe",
                                                                   self.lipsync.describe.remote()))
            self.stage_engines = stage_engines(voice_desc, lip_desc)

    async def report(self, method: str, without_replica: tuple[str, ...] = ()) -> dict[str, dict]:
        """Each stage's answer to `method` (describe or warm); a stage that cannot answer is
        reported as down, with why (the type only: a replica's exception text carries its traceback).
        A deployment in `without_replica` is reported down at once (asking it would wait for one)."""
        async def ask(name, handle):
            if self.deployment_of[name] in without_replica:
                return name, {"up": False, "model_loaded": False, "error": "no running replica"}
            try:
                return name, await asyncio.wait_for(getattr(handle, method).remote(), STAGE_INFO_TIMEOUT_S)
            except Exception as exc:  # reported, not raised: /health says which stage is down
                return name, {"up": False, "model_loaded": False, "error": type(exc).__name__}

        pairs = await asyncio.gather(ask("tts", self.speech), ask("voice", self.voice), ask("lipsync", self.lipsync))
        return dict(pairs)

    # ------------------------------------------------------------ lipserve.pipeline.Stages

    def languages(self):
        return self.stage_languages

    def engines(self):
        return self.stage_engines

    async def read(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def share(self, data: bytes):
        return put_bytes(data)

    async def synthesize(self, text, language, engine, seed):
        return await from_stage("SpeechSynthesizer", "tts", self.speech.synthesize.remote(text, language, engine, seed))

    async def convert(self, audio, sample_rate, reference, reference_is_video, deterministic, seed):
        return await from_stage("VoiceConverter", "voice", self.voice.convert.remote(
            audio, sample_rate, reference, reference_is_video, deterministic, seed))

    async def plan_faces(self, video, options, frames_needed):
        return await from_stage("LipSyncer", "faces", self.lipsync.plan_faces.remote(video, options, frames_needed))

    async def sync(self, video, audio, sample_rate, options, plan):
        return await from_stage("LipSyncer", "lipsync", self.lipsync.sync.remote(
            video, audio, sample_rate, options, plan))

    async def sync_stream(self, video, audio, sample_rate, options, plan):
        pieces = self.lipsync.options(stream=True).sync_stream.remote(video, audio, sample_rate, options, plan)
        try:
            async for item in pieces:
                yield item
        except STAGE_LOST as exc:
            raise stage_lost("LipSyncer", exc, "lipsync") from exc

