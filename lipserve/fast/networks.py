"""The fast graph of each network, with the call signature its stage already uses, and its bound.

| network        | runner call                                  | bound against fp32 eager (BOUNDS)                |
| WavLM-Large    | FastWavLM.extract_features(wav [B,T])        | every frame's cosine >= 0.999                    |
| SynthesizerTrn | FastSynthesizer.infer(c, g, noise_scale, gen)| waveform SNR >= 30 dB (same noise, or none)      |
| Wav2Lip        | FastWav2Lip(mel [B,1,80,16], face [B,6,96,96])| mean abs <= 1/255 of the [0, 1] output           |
| S3FD           | FastS3FD(x [B,3,H,W]) -> 12 head outputs     | max abs <= 1e-4 x max(1, max abs of fp32 output) |

The bounds are the ones the fast-path tests hold on the golden inputs and on the test clip;
the same functions (`*_error`) measure them there and in the load-time check.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import backend

log = logging.getLogger("lipserve.fast")

BOUNDS = {
    "wavlm": ("min frame cosine", 0.999, "min"),
    "synthesizer": ("SNR dB", 30.0, "min"),
    "wav2lip": ("mean abs", 1.0 / 255.0, "max"),
    "s3fd": ("max abs / max(1, |fp32|)", 1e-4, "max"),
}


def within(network: str, measured: float) -> bool:
    _, bound, kind = BOUNDS[network]
    return bool(np.isfinite(measured)) and (measured >= bound if kind == "min" else measured <= bound)


# ----------------------------------------------------------------------------- error measures

def frame_cosine_min(fast: torch.Tensor, reference: torch.Tensor) -> float:
    """Smallest cosine similarity between matching frames of [..., C] feature tensors."""
    a = fast.reshape(-1, fast.shape[-1]).double()
    b = reference.reshape(-1, reference.shape[-1]).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def snr_db(fast: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """10 log10(|reference|^2 / |fast - reference|^2); inf when identical."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    err = np.asarray(fast, dtype=np.float64).reshape(-1) - ref
    noise = float(np.sum(err * err))
    return float("inf") if noise == 0.0 else float(10.0 * np.log10(float(np.sum(ref * ref)) / noise))


def mean_abs(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return float((fast.double() - reference.double()).abs().mean())


def relative_max_abs(fast: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    worst = 0.0
    for f, r in zip(fast, reference):
        scale = max(1.0, float(r.abs().max()))
        worst = max(worst, float((f.double() - r.double()).abs().max()) / scale)
    return worst


# ----------------------------------------------------------------------------- runners

def _graph(module: nn.Module, examples: tuple[torch.Tensor, ...], name: str, threads: int, cache_dir: Path | None,
           shape_cache_entries: int | None = 0):
    """The compiled graph. Its shape cache is off unless the caller's shapes are few (Wav2Lip's batch
    sizes, the speech ladder's rungs): frame sizes change per source, and cached kernels for them only grow."""
    from .openvino_graph import CompiledGraph

    return CompiledGraph(module, examples, name=name, threads=threads, cache_dir=cache_dir,
                         shape_cache_entries=shape_cache_entries)


# The CPU plugin prepares its kernels for each new input shape, which costs about as much as the
# run itself (converting 1.75 s of speech: 0.76-1.17 s at a new length, 0.46-0.49 s at a known one),
# and every request's speech has a new length. So speech is padded up to the next length of a
# ladder, the padding masked so that the real part comes out as unpadded (WavLM: n_frames; the
# synthesizer: c_lengths, its decoder too), and each graph sees few shapes, whose kernels it keeps.
# The ladder: steps of 0.2 s, each rung at most 20 % above the last (LADDER_GROWTH): 26 rungs up to
# WavLM's longest window (30 s), 20 for speech up to 10 s; the padding is at most max(0.2 s, 20 %).
SPEECH_STEP_SAMPLES = 3200  # 0.2 s at 16 kHz
CONTENT_STEP_FRAMES = SPEECH_STEP_SAMPLES // 320  # the same 0.2 s in WavLM / content frames
LADDER_GROWTH = 1.2
# kernels each graph keeps: enough for every rung (the plugin's default, 5000, is not)
LADDER_SHAPE_CACHE = 20000


def bucketed(n: int, step: int) -> int:
    """n rounded up to the next rung of the ladder: rungs are multiples of `step` (0.2 s), each
    the larger of one step and LADDER_GROWTH above the one before."""
    rung = step
    while rung < n:
        rung = max(rung + step, int(rung * LADDER_GROWTH) // step * step)
    return rung


class _WavLMPadded(nn.Module):
    """extract_features of a padded waveform with its real frame count as an input."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, wav: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(wav, n_frames=n_frames.to(torch.int64))


class FastWavLM:
    """WavLM's extract_features as an OpenVINO graph (the eager module keeps the geometry and chunking).

    The waveform is padded up the length ladder (`bucketed`) with the padding masked (exact for
    WavLM-Large's per-frame extractor norm; a group-norm extractor takes the length as it is).
    """

    backend = "openvino"

    def __init__(self, model: nn.Module, threads: int, cache_dir: Path | None):
        self.model = model
        self.pads = getattr(getattr(model, "cfg", None), "extractor_mode", None) == "layer_norm"
        example = torch.zeros(1, 16000)  # 1 s; the converted graph keeps batch and length dynamic
        if self.pads:
            self.graph = _graph(_WavLMPadded(model).eval(), (example, torch.tensor([49.0])), "wavlm-padded",
                                threads, cache_dir, shape_cache_entries=LADDER_SHAPE_CACHE)
        else:
            self.graph = _graph(model, (example,), "wavlm", threads, cache_dir)

    def extract_features(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] 16 kHz -> [B, frames, C] float32 (CPU)."""
        if not self.pads:
            return torch.from_numpy(self.graph(wav)[0])
        frames = self.model.feature_extractor.n_frames(wav.shape[-1])
        padded = torch.nn.functional.pad(wav, (0, bucketed(wav.shape[-1], SPEECH_STEP_SAMPLES) - wav.shape[-1]))
        n_frames = torch.full((wav.shape[0],), float(frames))
        return torch.from_numpy(self.graph(padded, n_frames)[0][:, :frames])


class _SynthesizerNoiseless(nn.Module):
    """infer with the prior's noise off: (c padded, g, real frames) -> waveform."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, c: torch.Tensor, g: torch.Tensor, c_lengths: torch.Tensor) -> torch.Tensor:
        return self.net.infer(c, g=g, c_lengths=c_lengths.to(torch.int64), noise_scale=0.0)


class _SynthesizerWithNoise(nn.Module):
    """infer with the prior's noise given as an input, already multiplied by the noise scale."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, c: torch.Tensor, g: torch.Tensor, scaled_noise: torch.Tensor,
                c_lengths: torch.Tensor) -> torch.Tensor:
        return self.net.infer(c, g=g, c_lengths=c_lengths.to(torch.int64), noise_scale=1.0, noise=scaled_noise)


class FastSynthesizer:
    """SynthesizerTrn.infer as two OpenVINO graphs: noise off, and noise drawn here and passed in.

    The noise is drawn with torch exactly as the eager Encoder draws it (same shape, dtype and
    generator), so a seeded request gives the same noise on either path. The content is padded up
    the length ladder with the padding masked (c_lengths, the decoder too), the output cut back.
    """

    backend = "openvino"

    def __init__(self, net: nn.Module, threads: int, cache_dir: Path | None):
        self.net = net
        self.inter_channels = net.cfg.inter_channels
        self.hop = int(np.prod(net.cfg.upsample_rates))
        c = torch.zeros(1, net.cfg.ssl_dim, 50)
        g = torch.zeros(1, net.cfg.gin_channels)
        noise = torch.zeros(1, self.inter_channels, 50)
        lengths = torch.tensor([40.0])
        self.noiseless = _graph(_SynthesizerNoiseless(net).eval(), (c, g, lengths), f"{net.cfg.name}-noiseless-padded",
                                threads, cache_dir, shape_cache_entries=LADDER_SHAPE_CACHE)
        self.noisy = _graph(_SynthesizerWithNoise(net).eval(), (c, g, noise, lengths), f"{net.cfg.name}-noisy-padded",
                            threads, cache_dir, shape_cache_entries=LADDER_SHAPE_CACHE)

    def infer(self, c: torch.Tensor, g: torch.Tensor, noise_scale: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """c [B, ssl_dim, frames], g [B, gin] -> waveform [B, 1, samples] (CPU float32)."""
        frames = c.shape[-1]
        pad = bucketed(frames, CONTENT_STEP_FRAMES) - frames
        padded = torch.nn.functional.pad(c, (0, pad))
        lengths = torch.full((c.shape[0],), float(frames))
        if not noise_scale:
            out = self.noiseless(padded, g, lengths)[0]
        else:
            noise = torch.randn((c.shape[0], self.inter_channels, frames), generator=generator, dtype=torch.float32)
            out = self.noisy(padded, g, torch.nn.functional.pad(noise * noise_scale, (0, pad)), lengths)[0]
        return torch.from_numpy(out[..., :frames * self.hop])


class FastWav2Lip:
    """Wav2Lip's forward as an OpenVINO graph: (mel windows, faces) -> [B, 3, 96, 96] in [0, 1]."""

    backend = "openvino"

    def __init__(self, model: nn.Module, threads: int, cache_dir: Path | None):
        examples = (torch.zeros(2, 1, 80, 16), torch.zeros(2, 6, 96, 96))
        # its inputs take at most batch_size shapes (the full batch and each partial last one): the default cache
        self.graph = _graph(model, examples, "wav2lip", threads, cache_dir, shape_cache_entries=None)

    def __call__(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.graph(audio_sequences, face_sequences)[0])


class FastS3FD:
    """S3FD's forward as an OpenVINO graph: x [B, 3, H, W] -> the 12 head outputs (cls1, reg1, ...)."""

    backend = "openvino"

    def __init__(self, model: nn.Module, threads: int, cache_dir: Path | None):
        example = torch.zeros(1, 3, 128, 128)
        self.graph = _graph(model, (example,), "s3fd", threads, cache_dir)

    def eval(self) -> FastS3FD:  # the detector calls .eval() on whatever network it is given
        return self

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.graph(x)]


# ----------------------------------------------------------------------------- check inputs

def _check_waveform(seconds: float, seed: int) -> torch.Tensor:
    """A speech-like 16 kHz test signal: voiced harmonics under a syllable envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000.0
    pitch = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16000.0
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    wav = 0.3 * envelope * voiced / 3.0 + 0.01 * rng.standard_normal(t.size)
    return torch.from_numpy(wav.astype(np.float32))[None]


def _check_faces(batch: int, seed: int) -> torch.Tensor:
    """[B, 6, 96, 96] in [0, 1]: smooth shaded blobs with grain (lower half of the first 3 channels zeroed)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:96, 0:96] / 95.0
    faces = []
    for _ in range(batch):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.45)
        blob = np.clip(1.0 - ((xs - cx) ** 2 + (ys - cy) ** 2) / r ** 2, 0, 1)
        img = np.stack([0.2 + 0.6 * blob * c for c in rng.uniform(0.5, 1.0, 3)])
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        masked = img.copy()
        masked[:, 48:] = 0
        faces.append(np.concatenate([masked, img]))
    return torch.from_numpy(np.stack(faces).astype(np.float32))


def _check_mels(batch: int, seed: int) -> torch.Tensor:
    """[B, 1, 80, 16] mel windows of the check waveform (Wav2Lip's own front end)."""
    from ..audio.wav2lip_mel import melspectrogram

    mel = melspectrogram(_check_waveform(1.0, seed)[0].numpy())
    starts = np.linspace(0, mel.shape[1] - 16, batch).astype(int)
    return torch.from_numpy(np.stack([mel[:, s:s + 16] for s in starts])[:, None].astype(np.float32))


# ----------------------------------------------------------------------------- errors and builders

def wavlm_error(model: nn.Module, fast: FastWavLM, wav: torch.Tensor) -> float:
    with torch.inference_mode():
        return frame_cosine_min(fast.extract_features(wav), model.extract_features(wav))


def synthesizer_error(net: nn.Module, fast: FastSynthesizer, c: torch.Tensor, g: torch.Tensor,
                      noise_seed: int | None = None) -> float:
    """SNR (dB) of the fast waveform against eager, noise off (noise_seed None) or the same seeded noise."""
    scale = 0.0 if noise_seed is None else 1.0

    def generator():
        return None if noise_seed is None else torch.Generator().manual_seed(noise_seed)

    with torch.inference_mode():
        reference = net.infer(c, g=g, noise_scale=scale, generator=generator())
        return snr_db(fast.infer(c, g, noise_scale=scale, generator=generator()), reference)


def wav2lip_error(model: nn.Module, fast: FastWav2Lip, mel: torch.Tensor, face: torch.Tensor) -> float:
    with torch.inference_mode():
        return mean_abs(fast(mel, face), model(mel, face))


def s3fd_error(model: nn.Module, fast: FastS3FD, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return relative_max_abs(fast(x), list(model(x)))


def _checked(network: str, measured: float) -> tuple[str, float, float, bool]:
    metric, bound, _ = BOUNDS[network]
    return metric, measured, bound, within(network, measured)


def fast_wavlm(model: nn.Module, choice: str, device, threads: int, cache_dir: Path | None):
    """(runner with .extract_features, report): the OpenVINO graph or `model` itself."""
    def check(fast):
        # another length than the traced example, so a graph with a frozen length would fail here
        return _checked("wavlm", wavlm_error(model, fast, _check_waveform(1.3, seed=21)))

    return backend.choose("wavlm", choice, device, model, lambda: FastWavLM(model, threads, cache_dir), check)


class EagerSynthesizer:
    """The eager module behind the same .infer(c, g, noise_scale, generator) call as FastSynthesizer."""

    backend = "eager"

    def __init__(self, net: nn.Module):
        self.net = net

    def infer(self, c, g, noise_scale: float = 1.0, generator=None) -> torch.Tensor:
        return self.net.infer(c, g=g, noise_scale=noise_scale, generator=generator)


def fast_synthesizer(net: nn.Module, choice: str, device, threads: int, cache_dir: Path | None,
                     content: torch.Tensor | None = None):
    """(runner with .infer(c, g, noise_scale, generator), report). `content` [1, ssl_dim, frames]
    is the check input (WavLM features of a test signal); random features when not given."""
    def check(fast):
        c = content if content is not None else torch.randn(1, net.cfg.ssl_dim, 63, generator=torch.Generator().manual_seed(3))
        g = torch.nn.functional.normalize(torch.randn(1, net.cfg.gin_channels, generator=torch.Generator().manual_seed(4)), dim=1)
        worst = min(synthesizer_error(net, fast, c, g), synthesizer_error(net, fast, c, g, noise_seed=5))
        return _checked("synthesizer", worst)

    return backend.choose(f"synthesizer ({net.cfg.name})", choice, device, EagerSynthesizer(net),
                          lambda: FastSynthesizer(net, threads, cache_dir), check)


def fast_wav2lip(model: nn.Module, choice: str, device, threads: int, cache_dir: Path | None):
    """(callable (mel, face) -> output, report): the OpenVINO graph or `model` itself."""
    def check(fast):
        return _checked("wav2lip", wav2lip_error(model, fast, _check_mels(5, seed=8), _check_faces(5, seed=9)))

    return backend.choose("wav2lip", choice, device, model, lambda: FastWav2Lip(model, threads, cache_dir), check)


def fast_s3fd(model: nn.Module, choice: str, device, threads: int, cache_dir: Path | None):
    """(callable x -> 12 head outputs, report): the OpenVINO graph or `model` itself."""
    def check(fast):
        image = _check_faces(1, seed=10)[:, 3:] * 255.0 - 117.0  # RGB-like levels minus the means
        x = torch.nn.functional.interpolate(image, size=(180, 320), mode="bilinear", align_corners=False)
        return _checked("s3fd", s3fd_error(model, fast, x))

    return backend.choose("s3fd", choice, device, model, lambda: FastS3FD(model, threads, cache_dir), check)
