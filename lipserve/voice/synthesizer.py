"""FreeVC synthesizer loading and the FreeVC-s reference mel front end.

`load_synthesizer` reads `freevc.pth` / `freevc-s.pth` / `freevc-24.pth` in the official
layout (`{'model', 'iteration', 'learning_rate', ...}`, strict key check), or gives the
network the deterministic synthetic weights when allowed.

`reference_mel` is FreeVC's `mel_processing.mel_spectrogram_torch` as `convert.py` calls it
for FreeVC-s: reflect-pad (n_fft - hop) / 2 on each side, STFT without centring (Hann
1280, hop 320), magnitude sqrt(re^2 + im^2 + 1e-6), 80-band Slaney mel (librosa, fmin 0,
fmax sr/2), natural log of max(x, 1e-5).
"""
from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import torch

from ..models.freevc import SynthesizerTrn
from ..models.freevc_configs import FreeVCConfig, freevc_config
from ..settings import Settings
from ..weights.resolve import build_uninitialized, load_weights


def synthesizer_filename(variant: str) -> str:
    freevc_config(variant)  # unknown variant -> ValueError naming the known ones
    return f"{variant}.pth"


def load_synthesizer(settings: Settings, device: torch.device | str, variant: str | None = None) -> tuple[SynthesizerTrn, bool]:
    """(SynthesizerTrn in eval mode on `device`, synthetic) for `variant` (default settings.voice.freevc_variant)."""
    variant = variant or settings.voice.freevc_variant
    net = build_uninitialized(lambda: SynthesizerTrn(freevc_config(variant)))  # every tensor is loaded next
    synthetic, _ = load_weights(net, kind="freevc", filename=synthesizer_filename(variant),
                                weights_dir=settings.runtime.weights_dir, allow_synthetic=settings.runtime.allow_synthetic_weights,
                                what=f"voice conversion ({variant})")
    return net.to(device).eval(), synthetic


@lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


def reference_mel(wav: torch.Tensor, cfg: FreeVCConfig) -> torch.Tensor:
    """wav [B, T] float at cfg.sampling_rate -> log mel [B, 80, frames] (frames = T // hop)."""
    if wav.dim() == 1:
        wav = wav[None]
    n_fft, hop, win = cfg.filter_length, cfg.hop_length, cfg.win_length
    pad = (n_fft - hop) // 2
    if wav.size(-1) <= pad:
        raise ValueError(f"reference too short for the mel front end: {wav.size(-1)} samples, need more than {pad}")
    padded = torch.nn.functional.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(win, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(padded, n_fft, hop_length=hop, win_length=win, window=window, center=False,
                      normalized=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-6)
    basis = torch.from_numpy(_mel_basis(cfg.sampling_rate, n_fft, cfg.n_mel_channels, cfg.mel_fmin, cfg.mel_fmax))
    mel = torch.matmul(basis.to(device=wav.device, dtype=wav.dtype), magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))
