"""Lip-sync stage (Wav2Lip + face finding, one GPU): wraps lipserve.lipsync.LipSyncer.

`plan_faces` is the video branch (probe, decode the needed frames, face boxes; cached by video
hash inside LipSyncer); `sync` is the final step once the converted voice is ready.
"""
from __future__ import annotations

from ray import serve

from lipserve.pipeline import StageOutput

from .common import StageReplica, replica_gpu_share, resolve


@serve.deployment(
    name="LipSyncer",
    ray_actor_options={"num_cpus": 4, "num_gpus": 1},
    max_ongoing_requests=2,
    max_queued_requests=16,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,
)
class LipSyncDeployment(StageReplica):
    stage = "lipsync"
    stage_module = "lipserve.lipsync"

    def build(self, settings):
        from lipserve.lipsync import LipSyncer

        return LipSyncer(settings, gpu_share=replica_gpu_share())

    async def plan_faces(self, video, options: dict, frames_needed: int | None = None) -> StageOutput:
        from lipserve.lipsync import LipSyncOptions

        data = await resolve(video)
        return await self.run_timed("faces", lambda plan: plan.detector, self.worker.plan_faces, data,
                                    LipSyncOptions(**options), frames_needed)

    async def sync(self, video, audio, sample_rate: int, options: dict, plan=None) -> StageOutput:
        from lipserve.lipsync import LipSyncOptions

        data = await resolve(video)
        checkpoint = self.settings.wav2lip_checkpoint
        return await self.run_timed("lipsync", lambda r: checkpoint, self.worker.sync, data, audio, sample_rate,
                                    LipSyncOptions(**options), plan)
