"""Lip-sync stage (Wav2Lip + face finding, one GPU): wraps lipserve.lipsync.LipSyncer.

`plan_faces` is the video branch (probe, decode the needed frames, face boxes; cached by video
hash inside LipSyncer); `sync` is the final step once the converted voice is ready.
"""
from __future__ import annotations

from ray import serve

from lipserve.pipeline import StageOutput

from .common import StageReplica, resolve


@serve.deployment(name="LipSyncer")  # its resources and limits: the serve configs
class LipSyncDeployment(StageReplica):
    stage = "lipsync"
    owns = ("lipsync", "runtime")
    stage_module = "lipserve.lipsync"
    stage_class = "LipSyncer"

    async def plan_faces(self, video, options: dict, frames_needed: int | None = None) -> StageOutput:
        from lipserve.lipsync import LipSyncOptions

        data = await resolve(video)
        return await self.run_timed("faces", lambda plan: plan.detector, self.worker.plan_faces, data,
                                    LipSyncOptions(**options), frames_needed)

    async def sync(self, video, audio, sample_rate: int, options: dict, plan=None) -> StageOutput:
        from lipserve.lipsync import LipSyncOptions

        data = await resolve(video)
        checkpoint = self.settings.lipsync.wav2lip_checkpoint
        return await self.run_timed("lipsync", lambda r: checkpoint, self.worker.sync, data, audio, sample_rate,
                                    LipSyncOptions(**options), plan)

    async def sync_stream(self, video, audio, sample_rate: int, options: dict, plan=None):
        """`sync` as a stream (call with handle.options(stream=True)): fragmented-MP4 bytes as they are
        encoded, then the SyncResult (its mp4 empty: the pieces are the file). Tagged lipsync_stream."""
        from lipserve.lipsync import LipSyncOptions

        data = await resolve(video)
        pieces = self.worker.sync_stream(data, audio, sample_rate, LipSyncOptions(**options), plan)
        async for item in self.stream_timed("lipsync_stream", self.settings.lipsync.wav2lip_checkpoint, pieces):
            yield item

