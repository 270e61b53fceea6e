"""WavLM (Chen et al. 2022), the content encoder FreeVC feeds on.

A stack of strided convolutions turns 16 kHz audio into 50 frames per second, a linear
projection widens them, a grouped positional convolution adds position information, and a
Transformer with gated relative position bias contextualises them. FreeVC uses the last
layer's output (after the encoder's final layer norm) as its content features.

State-dict keys are those of the official release (`WavLM-Large.pt` is `{'cfg', 'model'}`),
so that file loads strictly. The module is built from the checkpoint's `cfg` dict, overlaid
on the defaults below, as the official `WavLMConfig` does. Only inference is implemented:
dropout, layer drop, masking and padding masks are training or batching concerns FreeVC
does not use (it encodes one utterance at a time).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

# The WavLMConfig class defaults (WavLM-Base shaped). A checkpoint's cfg overrides these.
DEFAULT_CONFIG: dict = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "feature_grad_mult": 1.0,
    "normalize": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "mask_length": 10,
    "mask_prob": 0.65,
    "mask_selection": "static",
    "mask_other": 0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "mask_channel_selection": "static",
    "mask_channel_other": 0,
    "no_mask_channel_overlap": False,
    "mask_channel_min_space": 1,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
}


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """The `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", as (dim, kernel, stride) tuples.

    The official code eval()s this string; a checkpoint is data, so only list/tuple literals
    of integers combined with + and * are accepted here.
    """

    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)[:80]}")

    layers = evaluate(ast.parse(spec.strip(), mode="eval").body)
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"conv_feature_layers must be a list of (dim, kernel, stride) tuples, got {spec!r}")
    return layers


@dataclass
class WavLMConfig:
    """The structural fields of the official config; `extra` keeps everything else the cfg carried."""

    extractor_mode: str
    encoder_layers: int
    encoder_embed_dim: int
    encoder_ffn_embed_dim: int
    encoder_attention_heads: int
    activation_fn: str
    layer_norm_first: bool
    conv_feature_layers: str
    conv_bias: bool
    normalize: bool
    conv_pos: int
    conv_pos_groups: int
    relative_position_embedding: bool
    num_buckets: int
    max_distance: int
    gru_rel_pos: bool
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict | None) -> WavLMConfig:
        merged = {**DEFAULT_CONFIG, **(cfg or {})}
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: merged[k] for k in names}
        return cls(**known, extra={k: v for k, v in merged.items() if k not in names})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (the conv front end does this under fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (the 'default' extractor mode's first block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type_as(x)


class TransposeLast(nn.Module):
    """[B, C, T] <-> [B, T, C], so a LayerNorm over channels can sit inside an nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """Waveform [B, T] -> features [B, 512, frames]; 320 samples per frame, 400-sample receptive field.

    Each block is conv -> dropout -> norm -> GELU as an nn.Sequential, which fixes the keys:
    layer_norm mode: `conv_layers.i.0.weight`, `conv_layers.i.2.1.{weight,bias}` (LayerNorm inside a
    transpose sandwich); default mode: a GroupNorm (one group per channel) in block 0 only.
    """

    def __init__(self, conv_layers: list[tuple[int, int, int]], mode: str, conv_bias: bool):
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {mode!r}")
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=conv_bias)
            if mode == "layer_norm":
                norm = nn.Sequential(TransposeLast(), Fp32LayerNorm(dim), TransposeLast())
                block = nn.Sequential(conv, nn.Dropout(0.0), norm, nn.GELU())
            elif i == 0:
                block = nn.Sequential(conv, nn.Dropout(0.0), Fp32GroupNorm(dim, dim), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.Dropout(0.0), nn.GELU())
            self.conv_layers.append(block)
            in_dim = dim
        self.kernels_strides = [(k, s) for _, k, s in conv_layers]

    def n_frames(self, n_samples: int) -> int:
        """Frames the stack yields for `n_samples` of audio (0 when it is shorter than the receptive field)."""
        n = n_samples
        for kernel, stride in self.kernels_strides:
            n = (n - kernel) // stride + 1
            if n <= 0:
                return 0
        return n

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)  # [B, 1, T]
        for block in self.conv_layers:
            x = block(x)
        return x  # [B, C, frames]


class WeightNormConv1d(nn.Module):
    """A Conv1d stored as weight-norm factors (weight = g * v / ||v||, the norm over every dim but `dim`).

    Parameters are named `weight_g`, `weight_v`, `bias`, the legacy torch.nn.utils.weight_norm
    naming the official checkpoint uses.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int, groups: int, dim: int):
        super().__init__()
        self.padding, self.groups, self.dim = padding, groups, dim
        weight_shape = (out_channels, in_channels // groups, kernel_size)
        g_shape = [1, 1, 1]
        g_shape[dim] = weight_shape[dim]
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_g = nn.Parameter(torch.ones(g_shape))
        self.weight_v = nn.Parameter(torch.randn(weight_shape) * (1.0 / math.sqrt(weight_shape[1] * kernel_size)))
        self._cached_weight: torch.Tensor | None = None
        self._cached_for: tuple | None = None

    def weight(self) -> torch.Tensor:
        factors = (self.weight_v, self.weight_g)
        if torch.is_grad_enabled() or any(p.is_inference() for p in factors):  # inference tensors have no version
            return torch._weight_norm(self.weight_v, self.weight_g, self.dim)
        # At inference the product is the same every call (~40 ms for WavLM-Large on 2 CPU cores),
        # so keep it until the factors change (load_state_dict bumps _version; .to()/assign move them).
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in factors)
        if self._cached_for != key:
            self._cached_weight = torch._weight_norm(self.weight_v, self.weight_g, self.dim)
            self._cached_for = key
        return self._cached_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """An even kernel with padding k//2 yields one extra step; drop it so the length is unchanged."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove] if self.remove else x


def relative_position_buckets(n_query: int, n_key: int, num_buckets: int, max_distance: int,
                              device: torch.device | None = None) -> torch.Tensor:
    """[n_query, n_key] bucket index of each (query, key) offset, bidirectional (T5-style).

    Half the buckets hold keys after the query, half keys before. Within each half, offsets
    below max_exact get their own bucket; larger ones share log-spaced buckets up to
    max_distance. Computed in float32 like the official code, since bucket edges depend on it.
    """
    offset = torch.arange(n_key, device=device)[None, :] - torch.arange(n_query, device=device)[:, None]
    half = num_buckets // 2
    buckets = (offset > 0).long() * half
    distance = offset.abs()
    max_exact = half // 2
    # log(0) = -inf is computed for distance 0 but discarded by the where() below.
    log_bucket = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    log_bucket = torch.clamp_max(max_exact + log_bucket.long(), half - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive relative position bias, gated per query (GRU-rel-pos).

    Only the first layer owns the bias table (`relative_attention_bias`, num_buckets x heads);
    later layers receive its [heads, T, T] bias and apply their own gate to it. The gate comes
    from the layer's (normalised) input x, split per head: two sigmoids a, b per head and query,
    gate = a * (b * grep_a - 1) + 2.
    """

    def __init__(self, dim: int, n_heads: int, *, has_relative_attention_bias: bool, num_buckets: int,
                 max_distance: int, gru_rel_pos: bool):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_a = nn.Parameter(torch.ones(1, n_heads, 1, 1))
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads) if has_relative_attention_bias else None
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)

    def position_bias(self, n_frames: int) -> torch.Tensor:
        """[heads, T, T] additive attention bias from the bucket table (first layer only)."""
        buckets = relative_position_buckets(n_frames, n_frames, self.num_buckets, self.max_distance,
                                            device=self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None,
                key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`key_bias` [B, 1, 1, T]: added to every query's scores (-inf keeps a padding frame out)."""
        B, T, C = x.shape
        if position_bias is None and self.relative_attention_bias is not None:
            position_bias = self.position_bias(T)
        attn_bias = None
        if position_bias is not None:
            attn_bias = position_bias.unsqueeze(0)  # [1, H, T, T]
            if self.gru_rel_pos:
                gates = self.grep_linear(self.split_heads(x))  # [B, H, T, 8]
                gate_a, gate_b = torch.sigmoid(gates.view(B, self.n_heads, T, 2, 4).sum(-1)).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, T, 1]
                attn_bias = gate * attn_bias  # [B, H, T, T]
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        if key_bias is not None:
            attn_bias = key_bias if attn_bias is None else attn_bias + key_bias
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)  # under autocast q is fp16/bf16 while the bias table is fp32
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # scale 1/sqrt(head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y), position_bias


class TransformerLayer(nn.Module):
    """Self-attention and a GELU feed-forward, each residual; pre-norm when layer_norm_first."""

    def __init__(self, cfg: WavLMConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = SelfAttention(
            dim, cfg.encoder_attention_heads, has_relative_attention_bias=has_relative_attention_bias,
            num_buckets=cfg.num_buckets, max_distance=cfg.max_distance, gru_rel_pos=cfg.gru_rel_pos)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        if cfg.activation_fn not in ("gelu", "relu"):
            raise ValueError(f"activation_fn {cfg.activation_fn!r} is not supported (gelu, relu)")
        self.activation = F.gelu if cfg.activation_fn == "gelu" else F.relu

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None,
                key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_norm_first:
            attn, position_bias = self.self_attn(self.self_attn_layer_norm(x), position_bias, key_bias)
            x = x + attn
            x = x + self.feed_forward(self.final_layer_norm(x))
        else:
            attn, position_bias = self.self_attn(x, position_bias, key_bias)
            x = self.self_attn_layer_norm(x + attn)
            x = self.final_layer_norm(x + self.feed_forward(x))
        return x, position_bias


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        # weight norm over dim 2: one gain per kernel tap, keys pos_conv.0.weight_g [1, 1, K]
        conv = WeightNormConv1d(dim, dim, cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups, dim=2)
        self.pos_conv = nn.Sequential(conv, SamePad(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, has_relative_attention_bias=cfg.relative_position_embedding and i == 0)
            for i in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, layer_outputs: list | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; appends each layer's output (before the final norm) to layer_outputs.

        `padding` [B, T] bool, True past each item's real frames: those frames are zeroed before
        the positional conv (so it sees what a conv's own zero padding shows at an unpadded input's
        end) and no frame attends to them, so the real frames come out as without the padding.
        """
        key_bias = None
        if padding is not None:
            x = x.masked_fill(padding[..., None], 0.0)
            key_bias = torch.zeros(padding.shape, dtype=x.dtype, device=x.device).masked_fill(padding, float("-inf"))
            key_bias = key_bias[:, None, None, :]
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = None  # made by layer 0, shared by every later layer
        for layer in self.layers:
            x, position_bias = layer(x, position_bias, key_bias)
            if layer_outputs is not None:
                layer_outputs.append(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class WavLM(nn.Module):
    """WavLM built from a checkpoint's cfg dict (overlaid on DEFAULT_CONFIG)."""

    def __init__(self, cfg: dict | WavLMConfig | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, WavLMConfig) else WavLMConfig.from_dict(cfg)
        conv_layers = parse_conv_layers(self.cfg.conv_feature_layers)
        feature_dim = conv_layers[-1][0]
        dim = self.cfg.encoder_embed_dim
        # training-time mask token: unused at inference, kept so the official file loads strictly
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.feature_extractor = ConvFeatureExtractor(conv_layers, self.cfg.extractor_mode, self.cfg.conv_bias)
        self.post_extract_proj = nn.Linear(feature_dim, dim) if feature_dim != dim else None
        self.encoder = TransformerEncoder(self.cfg)
        self.layer_norm = nn.LayerNorm(feature_dim)

    @property
    def samples_per_frame(self) -> int:
        """Hop between frames: 320 samples (20 ms at 16 kHz) for the standard layout."""
        return math.prod(s for _, s in self.feature_extractor.kernels_strides)

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees through the conv stack: 400 for the standard layout."""
        size = 1
        for kernel, stride in reversed(self.feature_extractor.kernels_strides):
            size = (size - 1) * stride + kernel
        return size

    def extract_features(self, wav: torch.Tensor, *, return_layers: bool = False,
                         n_frames: torch.Tensor | None = None):
        """wav [B, T] (raw 16 kHz waveform, not normalised, as FreeVC calls it) -> [B, frames, C].

        The last layer's output after encoder.layer_norm. With return_layers=True, returns
        (features, {'conv_features': [B, 512, frames], 'layer_outputs': [each layer's [B, frames, C]]}).
        `n_frames` [B] (int): each item's real frames, when the waveform was padded after them
        (feature_extractor.n_frames of its real samples); frames past them are padding, which the
        real frames do not see (an exact pad needs a per-frame extractor norm: extractor_mode
        "layer_norm", as WavLM-Large has). The padding frames' own output is meaningless.
        """
        if wav.dim() != 2:
            raise ValueError(f"expected a waveform batch [B, T], got shape {tuple(wav.shape)}")
        if self.feature_extractor.n_frames(wav.shape[-1]) < 1:
            raise ValueError(f"{wav.shape[-1]} samples is shorter than one WavLM frame (400 samples)")
        conv_features = self.feature_extractor(wav)
        x = self.layer_norm(conv_features.transpose(1, 2))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        layer_outputs = [] if return_layers else None
        padding = None
        if n_frames is not None:
            padding = torch.arange(x.shape[1], device=x.device)[None, :] >= n_frames.to(x.device)[:, None]
        x = self.encoder(x, layer_outputs, padding)
        if return_layers:
            return x, {"conv_features": conv_features, "layer_outputs": layer_outputs}
        return x

    def forward(self, wav: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.extract_features(wav, n_frames=n_frames)

    def extract_features_chunked(self, wav: torch.Tensor, *, chunk_frames: int = 1000,
                                 context_frames: int = 250, extract=None) -> torch.Tensor:
        """extract_features over long audio in overlapping windows, to bound attention memory.

        Attention memory grows with frames squared (the gated bias alone is heads x T x T per
        layer), so past `chunk_frames + 2 * context_frames` frames the waveform is cut into
        windows of `chunk_frames` frames with `context_frames` of context each side, and only
        each window's centre frames are kept. Window edges fall on frame boundaries (multiples
        of 320 samples), so the conv features are identical to a single pass; the Transformer
        sees `context_frames` (5 s at 250) of context instead of the whole utterance, so the
        output is an approximation near chunk joins. Shorter inputs take the exact path.
        `extract` (default self.extract_features) runs each window: another engine's copy of this
        network (lipserve.fast) reuses the windowing this way.
        """
        extract = extract or self.extract_features
        n_frames = self.feature_extractor.n_frames(wav.shape[-1])
        if n_frames <= chunk_frames + 2 * context_frames:
            return extract(wav)
        hop, window = self.samples_per_frame, self.receptive_field
        pieces = []
        for start in range(0, n_frames, chunk_frames):
            stop = min(start + chunk_frames, n_frames)
            first, last = max(0, start - context_frames), min(n_frames, stop + context_frames)
            # frames [first, last) need samples [first * hop, (last - 1) * hop + window)
            out = extract(wav[:, first * hop: (last - 1) * hop + window])
            pieces.append(out[:, start - first: stop - first])
        return torch.cat(pieces, dim=1)

