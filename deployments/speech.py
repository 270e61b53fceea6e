"""Text-to-speech stage (CPU): wraps lipserve.tts.SpeechSynthesizer."""
from __future__ import annotations

from ray import serve

from lipserve.pipeline import StageOutput

from .common import StageReplica


@serve.deployment(name="SpeechSynthesizer")  # its resources and limits: the serve configs
class SpeechDeployment(StageReplica):
    stage = "tts"
    owns = ("speech", "runtime")
    stage_module = "lipserve.tts"

    def build(self, settings):
        from lipserve.tts import SpeechSynthesizer

        synthesizer = SpeechSynthesizer(settings)
        synthesizer.preload()  # piper's ONNX session, so the first request does not pay for it
        return synthesizer

    async def synthesize(self, text: str, language: str = "en", engine: str = "auto",
                         seed: int | None = None) -> StageOutput:
        return await self.run_timed("tts", lambda r: r.engine, self.worker.synthesize, text, language, engine, seed)

    async def languages(self) -> dict[str, list[str]]:
        return self.worker.languages()
