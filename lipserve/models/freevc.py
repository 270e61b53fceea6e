"""FreeVC's synthesizer (SynthesizerTrn): WavLM content -> prior encoder -> reverse flow -> HiFi-GAN.

Parameter names follow the official checkpoints exactly (OlaWod/FreeVC `models.py`,
`modules.py`), including the legacy weight-norm naming `weight_g` / `weight_v`, so a
`freevc*.pth` loads with strict key checking. No I/O here.

Inference path: c [B,1024,T] (WavLM-Large last layer, channels first) -> enc_p gives the
prior mean/log-scale -> a sample z_p (noise scale 1 officially; 0 = deterministic) -> the
coupling flow run backwards, conditioned on the speaker vector g -> the generator turns
z into a waveform, T * prod(upsample_rates) samples long.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .freevc_configs import FreeVCConfig

LRELU_SLOPE = 0.1


def _weight_from_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm taken over every dim but the first (weight_norm with dim=0)."""
    norm = weight_v.norm(dim=tuple(range(1, weight_v.dim())), keepdim=True)
    return weight_v * (weight_g / norm)


class _WeightNormMixin:
    """Recomputes w from (g, v) for training, but reuses it across inference calls until g or v change."""

    def normalized_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _weight_from_norm(self.weight_g, self.weight_v)
        # in-place loads bump _version, .to() gives new storage: either invalidates the cached weight
        stamp = (self.weight_g._version, self.weight_v._version, self.weight_g.data_ptr(), self.weight_v.data_ptr())
        if getattr(self, "_cached_stamp", None) != stamp:
            self._cached_weight = _weight_from_norm(self.weight_g, self.weight_v)
            self._cached_stamp = stamp
        return self._cached_weight


class WNConv1d(_WeightNormMixin, nn.Module):
    """Conv1d with weight normalisation, stored as (bias, weight_g, weight_v) like the legacy torch helper.

    Written out instead of `torch.nn.utils.weight_norm` (deprecated) so the key names stay fixed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, padding: int = 0):
        super().__init__()
        self.dilation, self.padding = dilation, padding
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_g = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.normalized_weight()
        return F.conv1d(x, weight, self.bias, dilation=self.dilation, padding=self.padding)


class WNConvTranspose1d(_WeightNormMixin, nn.Module):
    """ConvTranspose1d with weight normalisation over dim 0, so weight_g is [in, 1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_g = nn.Parameter(torch.ones(in_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.randn(in_channels, out_channels, kernel_size) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.normalized_weight()
        return F.conv_transpose1d(x, weight, self.bias, stride=self.stride, padding=self.padding)


class WN(nn.Module):
    """WaveNet-style stack of gated dilated convolutions (non-causal), optionally speaker-conditioned."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        if gin_channels:
            # one 1x1 conv makes the conditioning for all layers at once
            self.cond_layer = WNConv1d(gin_channels, 2 * hidden * n_layers, 1)
        for i in range(n_layers):
            dilation = dilation_rate ** i
            self.in_layers.append(WNConv1d(hidden, 2 * hidden, kernel_size, dilation=dilation,
                                           padding=(kernel_size * dilation - dilation) // 2))
            # the last layer only feeds the skip sum, so it has half the outputs
            out = 2 * hidden if i < n_layers - 1 else hidden
            self.res_skip_layers.append(WNConv1d(hidden, out, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        skip = torch.zeros_like(x)
        cond = self.cond_layer(g) if g is not None else None
        h = self.hidden
        for i in range(self.n_layers):
            pre = self.in_layers[i](x)
            if cond is not None:
                pre = pre + cond[:, 2 * h * i: 2 * h * (i + 1)]
            acts = torch.tanh(pre[:, :h]) * torch.sigmoid(pre[:, h:])
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :h]) * x_mask
                skip = skip + res_skip[:, h:]
            else:
                skip = skip + res_skip
        return skip * x_mask


class Encoder(nn.Module):
    """1x1 conv in, WN stack, 1x1 conv to (mean, log-scale); samples z = m + noise * exp(logs).

    enc_p (content -> prior) and enc_q (linear spectrogram -> posterior, training only) share it.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int,
                 dilation_rate: int, n_layers: int, gin_channels: int = 0):
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden, 1)
        self.enc = WN(hidden, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.proj = nn.Conv1d(hidden, out_channels * 2, 1)

    def forward(self, x: torch.Tensor, x_lengths: torch.Tensor, g: torch.Tensor | None = None, *,
                noise_scale: float = 1.0, generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """`noise` (shape of m): the standard normal draw, given instead of sampled here (an exported graph
        takes it as an input); still multiplied by noise_scale."""
        steps = torch.arange(x.size(2), device=x.device)
        x_mask = (steps[None, :] < x_lengths[:, None]).unsqueeze(1).to(x.dtype)
        x = self.pre(x) * x_mask
        x = self.enc(x, x_mask, g=g)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        if noise_scale:
            if noise is None:
                noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
            z = (m + noise * noise_scale * torch.exp(logs)) * x_mask
        else:
            z = m * x_mask  # the official sample with the noise switched off
        return z, m, logs, x_mask


class ResidualCouplingLayer(nn.Module):
    """Affine coupling with mean only (log-scale fixed at 0): the second half is shifted by f(first half)."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def shift(self, x0: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        h = self.pre(x0) * x_mask
        h = self.enc(h, x_mask, g=g)
        return self.post(h) * x_mask

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.half, self.half], dim=1)
        m = self.shift(x0, x_mask, g)
        x1 = (x1 - m) * x_mask if reverse else m + x1 * x_mask
        return torch.cat([x0, x1], dim=1)


class Flip(nn.Module):
    """Reverses the channel order between couplings (no parameters, but it holds a slot in `flows`)."""

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
        return torch.flip(x, [1])


class ResidualCouplingBlock(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 n_flows: int = 4, gin_channels: int = 0):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(ResidualCouplingLayer(channels, hidden, kernel_size, dilation_rate, n_layers, gin_channels))
            self.flows.append(Flip())

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
        for flow in (reversed(self.flows) if reverse else self.flows):
            x = flow(x, x_mask, g=g, reverse=reverse)
        return x


def _masked(x: torch.Tensor, x_mask: torch.Tensor | None) -> torch.Tensor:
    return x if x_mask is None else x * x_mask


class ResBlock1(nn.Module):
    """HiFi-GAN residual block type 1: three (dilated conv, plain conv) pairs, each with a skip."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=1, padding=(kernel_size - 1) // 2) for _ in dilations)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(_masked(F.leaky_relu(x, LRELU_SLOPE), x_mask))
            xt = c2(_masked(F.leaky_relu(xt, LRELU_SLOPE), x_mask))
            x = x + xt
        return x


class ResBlock2(nn.Module):
    """HiFi-GAN residual block type 2 (no published FreeVC config uses it; kept so `resblock: "2"` builds)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2) for d in dilations)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(_masked(F.leaky_relu(x, LRELU_SLOPE), x_mask))
        return x


class Generator(nn.Module):
    """HiFi-GAN generator with a global speaker condition added after conv_pre."""

    def __init__(self, cfg: FreeVCConfig):
        super().__init__()
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.upsample_rates = tuple(cfg.upsample_rates)
        ch0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.inter_channels, ch0, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(ch0 // 2 ** i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        block = ResBlock1 if cfg.resblock == "1" else ResBlock2
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = ch0 // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        if cfg.gin_channels:
            self.cond = nn.Conv1d(cfg.gin_channels, ch0, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, inter, frames] -> [B, 1, frames * hop]. `x_mask` [B, 1, frames] (1 on real frames, 0 on
        padding after them, x already 0 there): every conv's input is zeroed past the real part, as
        its own zero padding is at an unpadded input's end, so the real samples come out as without
        the padding. Upstream runs without a mask (a padded batch's tail then differs)."""
        x = self.conv_pre(x)
        if g is not None:
            x = x + self.cond(g)
        for i, (up, rate) in enumerate(zip(self.ups, self.upsample_rates)):
            x = up(_masked(F.leaky_relu(x, LRELU_SLOPE), x_mask))
            x_mask = None if x_mask is None else x_mask.repeat_interleave(rate, dim=-1)
            # multi-receptive-field fusion: average the parallel residual blocks
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x, x_mask) for block in blocks) / self.num_kernels
        x = self.conv_post(_masked(F.leaky_relu(x), x_mask))  # default slope 0.01 here, as upstream HiFi-GAN has it
        return torch.tanh(x)


class MelSpeakerEncoder(nn.Module):
    """FreeVC-s's own speaker encoder (`enc_spk`): 3-layer LSTM over an 80-band log mel + Linear + ReLU + L2 norm."""

    def __init__(self, mel_channels: int = 80, layers: int = 3, hidden: int = 256, embedding: int = 256):
        super().__init__()
        self.lstm = nn.LSTM(mel_channels, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, embedding)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """mels [N, frames, 80] -> unit-norm embeddings [N, 256] (from the last layer's final hidden state)."""
        _, (hidden, _) = self.lstm(mels)
        raw = F.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)

    def embed_utterance(self, mel: torch.Tensor, partial_frames: int = 128, partial_hop: int = 64) -> torch.Tensor:
        """mel [B, frames, 80] -> [B, 256]: mean over 128-frame windows every 64 frames plus the last
        128 frames (not re-normalised, as upstream); a single window when the mel is short."""
        embeds = []
        for item in mel:
            frames = item.size(0)
            last = item[-partial_frames:]
            if frames > partial_frames:
                windows = [item[s:s + partial_frames] for s in range(0, frames - partial_frames, partial_hop)]
                windows.append(last)
                embeds.append(self(torch.stack(windows)).mean(dim=0))
            else:
                embeds.append(self(last[None])[0])
        return torch.stack(embeds)


class SynthesizerTrn(nn.Module):
    def __init__(self, cfg: FreeVCConfig):
        super().__init__()
        self.cfg = cfg
        self.use_spk = cfg.use_spk
        # member order fixes the state_dict order of the official checkpoints
        self.enc_p = Encoder(cfg.ssl_dim, cfg.inter_channels, cfg.hidden_channels, 5, 1, 16)
        self.dec = Generator(cfg)
        self.enc_q = Encoder(cfg.spec_channels, cfg.inter_channels, cfg.hidden_channels, 5, 1, 16,
                             gin_channels=cfg.gin_channels)
        self.flow = ResidualCouplingBlock(cfg.inter_channels, cfg.hidden_channels, 5, 1, 4, gin_channels=cfg.gin_channels)
        if not cfg.use_spk:
            self.enc_spk = MelSpeakerEncoder(cfg.n_mel_channels, 3, cfg.gin_channels, cfg.gin_channels)

    def speaker_vector(self, g: torch.Tensor | None = None, mel: torch.Tensor | None = None) -> torch.Tensor:
        """The [B, 256] speaker condition: `g` as given, or (FreeVC-s) enc_spk's embedding of mel [B, 80, frames]."""
        if g is not None:
            return g
        if mel is None:
            raise ValueError("SynthesizerTrn needs a speaker embedding g" + ("" if self.use_spk else " or a reference mel"))
        if self.use_spk:
            raise ValueError(f"{self.cfg.name} has no mel speaker encoder; pass g from the speaker encoder")
        return self.enc_spk.embed_utterance(mel.transpose(1, 2))

    def infer_steps(self, c: torch.Tensor, g: torch.Tensor | None = None, mel: torch.Tensor | None = None,
                    c_lengths: torch.Tensor | None = None, noise_scale: float = 1.0,
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`infer` plus its intermediates: z_p, m_p, logs_p (prior), z (after the reverse flow), out.

        With `c_lengths` the decoder masks past each item's length too (upstream's does not), so a
        padded item's first c_lengths * hop samples are what it gives unpadded."""
        padded = c_lengths is not None
        if c_lengths is None:
            c_lengths = torch.full((c.size(0),), c.size(-1), device=c.device)
        g = self.speaker_vector(g, mel).unsqueeze(-1)
        z_p, m_p, logs_p, c_mask = self.enc_p(c, c_lengths, noise_scale=noise_scale, generator=generator, noise=noise)
        z = self.flow(z_p, c_mask, g=g, reverse=True)
        out = self.dec(z * c_mask, g=g, x_mask=c_mask if padded else None)
        return {"z_p": z_p, "m_p": m_p, "logs_p": logs_p, "z": z, "out": out}

    def infer(self, c: torch.Tensor, g: torch.Tensor | None = None, mel: torch.Tensor | None = None,
              c_lengths: torch.Tensor | None = None, noise_scale: float = 1.0,
              generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """c [B, ssl_dim, frames] -> waveform [B, 1, frames * output_hop] in [-1, 1].

        noise_scale 1.0 is the official random sampling of the prior; 0 makes the output deterministic.
        `noise` [B, inter_channels, frames] replaces the standard normal draw when given.
        """
        return self.infer_steps(c, g, mel, c_lengths, noise_scale, generator, noise)["out"]
