"""Lip sync: Wav2Lip over the face found in the source video (no Ray)."""
from .options import LipSyncOptions
from .planner import FacePlan, FacePlanner
from .syncer import LipSyncer, SyncResult

__all__ = ["FacePlan", "FacePlanner", "LipSyncer", "LipSyncOptions", "SyncResult"]
