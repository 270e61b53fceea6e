"""Lip sync: Wav2Lip over the face found in the source video (no Ray)."""
from .options import LipSyncOptions
from .planner import FacePlan, FacePlanner
from .results import SyncResult
from .syncer import LipSyncer

__all__ = ["FacePlan", "FacePlanner", "LipSyncer", "LipSyncOptions", "SyncResult"]
