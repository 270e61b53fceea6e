"""Lip sync: Wav2Lip over the face found in the source video (no Ray)."""
from .syncer import FacePlan, LipSyncer, LipSyncOptions, SyncResult

__all__ = ["FacePlan", "LipSyncer", "LipSyncOptions", "SyncResult"]
