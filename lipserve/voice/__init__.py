"""The voice stage: FreeVC voice conversion (content from WavLM, speaker from a reference)."""

from .converter import VoiceConverter, VoiceResult
from .reference import prepare_reference, reference_from_audio, reference_from_video
from .synthesizer import load_synthesizer, reference_mel

__all__ = ["VoiceConverter", "VoiceResult", "load_synthesizer", "prepare_reference", "reference_from_audio",
           "reference_from_video", "reference_mel"]
