"""The speaker encoder FreeVC conditions on (GE2E-style d-vector, as in Resemblyzer).

A 3-layer LSTM reads 160 frames (1.6 s) of 40-band power mel; the last layer's final hidden
state goes through a linear layer and a ReLU and is L2-normalised into a 256-d embedding.
Keys equal the official `model_state` (`lstm.*`, `linear.*`); the training-only
`similarity_weight`/`similarity_bias` in that file are not part of this network.
"""
from __future__ import annotations

import torch
from torch import nn

MEL_CHANNELS = 40
HIDDEN_SIZE = 256
EMBEDDING_SIZE = 256
NUM_LAYERS = 3
PARTIAL_FRAMES = 160  # frames per partial utterance (1.6 s at 100 frames/s)


class SpeakerEncoder(nn.Module):
    def __init__(self, mel_channels: int = MEL_CHANNELS, hidden_size: int = HIDDEN_SIZE,
                 embedding_size: int = EMBEDDING_SIZE, num_layers: int = NUM_LAYERS):
        super().__init__()
        self.lstm = nn.LSTM(mel_channels, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, embedding_size)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """mels [B, frames, 40] (power mel, no log) -> [B, 256] unit-norm embeddings."""
        _, (hidden, _) = self.lstm(mels)  # hidden: [layers, B, hidden]
        embeds = self.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)
