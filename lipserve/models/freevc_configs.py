"""Hyperparameters of the three published FreeVC checkpoints, kept in code (never downloaded).

Values are those of the official `configs/freevc.json`, `configs/freevc-s.json` and
`tips-for-synthesizing-24KHz-wavs-from-16kHz-wavs/freevc-24.json` (OlaWod/FreeVC @ 60032a7).
All three take 16 kHz audio and 50 content frames per second (hop 320 at 16 kHz); FreeVC-24
only upsamples each frame to 480 samples, i.e. 24 kHz output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FreeVCConfig:
    name: str
    use_spk: bool  # True: speaker embedding from the external speaker encoder; False: own mel encoder (enc_spk)
    upsample_rates: tuple[int, ...]
    segment_size: int  # training segment in samples (only kept for completeness)
    output_sample_rate: int
    # data section (the input side: WavLM audio and FreeVC-s reference mel)
    sampling_rate: int = 16000
    filter_length: int = 1280
    hop_length: int = 320
    win_length: int = 1280
    n_mel_channels: int = 80
    mel_fmin: float = 0.0
    mel_fmax: float | None = None
    # model section
    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768  # unused by SynthesizerTrn (a VITS leftover in the json)
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    p_dropout: float = 0.1
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    gin_channels: int = 256
    ssl_dim: int = 1024

    @property
    def spec_channels(self) -> int:
        """Linear-spectrogram bins fed to enc_q (training only, but it fixes enc_q.pre's shape)."""
        return self.filter_length // 2 + 1

    @property
    def output_hop(self) -> int:
        """Output samples per content frame: 320 at 16 kHz, 480 for FreeVC-24."""
        return math.prod(self.upsample_rates)


FREEVC_CONFIGS: dict[str, FreeVCConfig] = {
    "freevc": FreeVCConfig("freevc", use_spk=True, upsample_rates=(10, 8, 2, 2), segment_size=8960, output_sample_rate=16000),
    "freevc-s": FreeVCConfig("freevc-s", use_spk=False, upsample_rates=(10, 8, 2, 2), segment_size=8960, output_sample_rate=16000),
    "freevc-24": FreeVCConfig("freevc-24", use_spk=True, upsample_rates=(10, 6, 4, 2), segment_size=8640, output_sample_rate=24000),
}


def freevc_config(variant: str) -> FreeVCConfig:
    try:
        return FREEVC_CONFIGS[variant]
    except KeyError:
        raise ValueError(f"unknown FreeVC variant {variant!r}; known: {sorted(FREEVC_CONFIGS)}") from None
