"""Wav2Lip generator (Prajwal et al., 2020): redraws the lower half of a 96x96 face to match 0.2 s of speech.

Inputs (one output frame per sample):
  audio_sequences [B,1,80,16]  a mel window (80 bands x 16 frames = 0.2 s), values in [-4, 4]
  face_sequences  [B,6,96,96]  channels 0-2: the crop with its lower half zeroed (where to draw),
                               channels 3-5: a reference crop of the same face (whose face it is);
                               BGR order, values in [0, 1], as the official inference feeds them
  -> [B,3,96,96] in [0, 1], BGR.

The 5-D form of the training code is accepted too: audio [B,T,1,80,16] and face [B,6,T,96,96]
give [B,3,T,96,96].

U-Net shape: a face encoder takes 96 -> 1 in seven stages, keeping each stage's features as skip
connections; an audio encoder takes the mel window to a 512-d vector; the decoder grows that vector
back to 96x96, concatenating the matching face feature after every stage.

Parameter names equal the official checkpoint's keys (after `module.` is stripped), so
`wav2lip.pth` / `wav2lip_gan.pth` load with strict=True: 352 tensors, 36,320,787 values.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv -> batch norm (-> + input) -> ReLU. Keys: conv_block.0 (conv), conv_block.1 (norm)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride=1, padding: int = 0, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding),
            nn.BatchNorm2d(cout),
        )
        self.residual = residual
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class UpConvBlock(nn.Module):
    """transposed conv -> batch norm -> ReLU: the decoder's upsampling step."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, output_padding: int = 0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _down(cin: int, cout: int, n_residual: int) -> nn.Sequential:
    """A stride-2 conv that halves the size, then residual 3x3 convs at the new size."""
    layers = [ConvBlock(cin, cout, 3, 2, 1)]
    layers += [ConvBlock(cout, cout, 3, 1, 1, residual=True) for _ in range(n_residual)]
    return nn.Sequential(*layers)


def _up(cin: int, cout: int, n_residual: int) -> nn.Sequential:
    """A stride-2 transposed conv that doubles the size, then residual 3x3 convs."""
    layers = [UpConvBlock(cin, cout, 3, 2, 1, output_padding=1)]
    layers += [ConvBlock(cout, cout, 3, 1, 1, residual=True) for _ in range(n_residual)]
    return nn.Sequential(*layers)


class Wav2Lip(nn.Module):
    def __init__(self):
        super().__init__()
        # 6x96x96 -> 512x1x1; each entry's output is a skip connection for the decoder
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(ConvBlock(6, 16, 7, 1, 3)),  # 16x96x96
            _down(16, 32, 2),                           # 32x48x48
            _down(32, 64, 3),                           # 64x24x24
            _down(64, 128, 2),                          # 128x12x12
            _down(128, 256, 2),                         # 256x6x6
            _down(256, 512, 1),                         # 512x3x3
            nn.Sequential(                              # 512x1x1
                ConvBlock(512, 512, 3, 1, 0),
                ConvBlock(512, 512, 1, 1, 0),
            ),
        ])

        # 1x80x16 mel window -> 512x1x1; strides squeeze the 80 bands harder than the 16 frames
        self.audio_encoder = nn.Sequential(
            ConvBlock(1, 32, 3, 1, 1),                   # 32x80x16
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 32, 3, 1, 1, residual=True),
            ConvBlock(32, 64, 3, (3, 1), 1),             # 64x27x16
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 64, 3, 1, 1, residual=True),
            ConvBlock(64, 128, 3, 3, 1),                 # 128x9x6
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 128, 3, 1, 1, residual=True),
            ConvBlock(128, 256, 3, (3, 2), 1),           # 256x3x3
            ConvBlock(256, 256, 3, 1, 1, residual=True),
            ConvBlock(256, 512, 3, 1, 0),                # 512x1x1
            ConvBlock(512, 512, 1, 1, 0),
        )

        # 512x1x1 -> 64x96x96; every stage's input is (previous output ++ matching encoder feature),
        # hence the doubled input widths
        self.face_decoder_blocks = nn.ModuleList([
            nn.Sequential(ConvBlock(512, 512, 1, 1, 0)),  # 512x1x1
            nn.Sequential(                                # 512x3x3
                UpConvBlock(1024, 512, 3, 1, 0),
                ConvBlock(512, 512, 3, 1, 1, residual=True),
            ),
            _up(1024, 512, 2),                            # 512x6x6
            _up(768, 384, 2),                             # 384x12x12
            _up(512, 256, 2),                             # 256x24x24
            _up(320, 128, 2),                             # 128x48x48
            _up(160, 64, 2),                              # 64x96x96
        ])

        # (64 decoded ++ 16 from the first encoder stage) -> RGB in [0, 1]
        self.output_block = nn.Sequential(
            ConvBlock(80, 32, 3, 1, 1),
            nn.Conv2d(32, 3, 1, 1, 0),
            nn.Sigmoid(),
        )

    def forward(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> torch.Tensor:
        # training-style 5-D input: fold the time axis into the batch, unfold at the end
        batch_size = audio_sequences.size(0)
        sequence_input = audio_sequences.dim() > 4
        if sequence_input:
            steps = audio_sequences.size(1)
            audio_sequences = torch.cat([audio_sequences[:, t] for t in range(steps)], dim=0)
            face_sequences = torch.cat([face_sequences[:, :, t] for t in range(steps)], dim=0)

        audio_embedding = self.audio_encoder(audio_sequences)  # B,512,1,1

        skips = []
        x = face_sequences
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)

        x = audio_embedding
        for block in self.face_decoder_blocks:
            x = block(x)
            x = torch.cat((x, skips.pop()), dim=1)

        x = self.output_block(x)

        if sequence_input:
            x = torch.stack(torch.split(x, batch_size, dim=0), dim=2)  # B,3,T,96,96
        return x
