"""Voice conversion stage (FreeVC, half a GPU): wraps lipserve.voice.VoiceConverter.

The reference voice comes from the source video's audio track (or a separate reference file),
fetched from Ray's object store, never from storage.
"""
from __future__ import annotations

from ray import serve

from lipserve.pipeline import StageOutput, convert_voice

from .common import StageReplica, resolve


@serve.deployment(name="VoiceConverter")  # its resources and limits: the serve configs
class VoiceDeployment(StageReplica):
    stage = "voice"
    owns = ("voice", "runtime")
    stage_module = "lipserve.voice"
    stage_class = "VoiceConverter"

    async def convert(self, audio, sample_rate: int, reference, reference_is_video: bool = True,
                      deterministic: bool = False, seed: int | None = None) -> StageOutput:
        data = await resolve(reference)
        variant = self.settings.voice.freevc_variant
        return await self.run_timed("voice", lambda r: variant, convert_voice, self.worker, audio, sample_rate,
                                    data, reference_is_video, deterministic, seed)
