"""The utterance embedding of a reference voice, as FreeVC's SpeakerEncoder.embed_utterance makes it."""
from __future__ import annotations

import numpy as np
import torch

from ..audio.speaker_mel import partial_slices, wav_to_mel
from ..models.speaker_encoder import SpeakerEncoder


def embed_utterance(encoder: SpeakerEncoder, wav: np.ndarray, *, rate: float = 1.3, min_coverage: float = 0.75,
                    return_partials: bool = False):
    """16 kHz waveform [T] -> unit-norm speaker embedding [256] (float32 numpy).

    The waveform is zero-padded to cover the last partial window, its mel cut into windows
    of 160 frames (1.6 s, overlapping), each window embedded in one batch, and the mean of
    the partial embeddings L2-normalised. With return_partials=True, returns
    (embed, partial_embeds [n, 256], wav_slices) as the official function does, plus a dict
    with the padded waveform, its mel and the mel slices (for checking the front end).
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"expected a non-empty mono waveform, got shape {wav.shape}")
    wav_slices, mel_slices = partial_slices(len(wav), rate, min_coverage)
    padded_length = wav_slices[-1][1]
    if padded_length >= len(wav):
        wav = np.pad(wav, (0, padded_length - len(wav)))
    mel = wav_to_mel(wav)
    mels = np.stack([mel[start:stop] for start, stop in mel_slices])  # [n, 160, 40]
    param = next(encoder.parameters())
    with torch.inference_mode():
        partial_embeds = encoder(torch.from_numpy(mels).to(param.device, param.dtype)).float().cpu().numpy()
    mean = partial_embeds.mean(axis=0)
    embed = mean / np.linalg.norm(mean, 2)
    if return_partials:
        details = {"wav_padded": wav, "mel": mel, "mel_slices": mel_slices}
        return embed, partial_embeds, wav_slices, details
    return embed
