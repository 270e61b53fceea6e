"""Audio front ends of the networks (no I/O: arrays in, arrays out)."""
from .wav2lip_mel import mel_basis, mel_chunk_starts, mel_chunks, melspectrogram

__all__ = ["mel_basis", "mel_chunk_starts", "mel_chunks", "melspectrogram"]
