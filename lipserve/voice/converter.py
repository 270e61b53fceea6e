"""VoiceConverter: the TTS speech in the user's own voice (FreeVC), with models loaded once.

Per request, as FreeVC's `convert.py` does it: 16 kHz source -> WavLM-Large last-layer
features (content) -> speaker vector of the silence-trimmed reference (the speaker encoder's
utterance embedding; FreeVC-s: its own mel encoder) -> SynthesizerTrn.infer.

What we add: the speaker vector is cached by the reference's content hash, so a returning
video skips the speaker encoder; `deterministic=True` switches the prior's noise off so a
repeated request gives identical audio; long speech goes through WavLM in windows; the
output is cut or zero-padded to exactly the source duration (the official output can fall
up to 399 samples short, as WavLM drops the last partial frame).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import librosa
import numpy as np
import torch

from ..cache import LRUCache, content_key
from ..device import autocast_dtype, pick_device
from ..errors import InvalidAudio
from ..models.freevc_configs import freevc_config
from ..settings import Settings
from . import reference as reference_mod
from .synthesizer import load_synthesizer, reference_mel

log = logging.getLogger("lipserve.voice")

CONTENT_RATE = 16000  # WavLM and the speaker encoder both take 16 kHz
MIN_SPEECH_SAMPLES = 400  # one WavLM frame
REFERENCE_CACHE_ENTRIES = 32  # trimmed reference voices by video hash (up to 60 s x 64 kB/s = 3.8 MB each)
# Reduced precision (CUDA autocast) is kept only while a test conversion at load stays this close to
# fp32 (max absolute difference of the waveform, full scale 1.0); otherwise precision "auto" falls back
# to fp32. Measured with CPU autocast (same casts) on the synthetic weights, WavLM-Large + FreeVC, 1 s of
# speech: fp16 2.3e-3, bf16 1.6e-2. Not measured on a GPU.
AUTOCAST_MAX_ABS_DIFF = 0.02


@dataclass
class VoiceResult:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int  # 16000 (24000 for freevc-24)
    speaker_cached: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds: resample, wavlm, speaker_embedding, synthesis
    synthetic_weights: bool = False


class VoiceConverter:
    def __init__(self, settings: Settings, *, wavlm=None, speaker_encoder=None, synthesizer=None,
                 given_models_synthetic: bool = False):
        """Loads WavLM, the SynthesizerTrn variant and (FreeVC, FreeVC-24) the speaker encoder once.

        Already loaded models may be passed in (tests, sharing between converters); say with
        `given_models_synthetic` whether any of them carries synthetic weights.
        """
        self.settings = settings
        self.variant = settings.freevc_variant
        self.cfg = freevc_config(self.variant)
        self.device = pick_device(settings.device)
        self.precision = settings.precision
        self.autocast = autocast_dtype(self.device, settings.precision)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        from .loaders import load_speaker_encoder, load_wavlm  # written beside this module

        start = time.perf_counter()
        synthetic = [given_models_synthetic]
        if wavlm is None:
            wavlm, flag = load_wavlm(settings, self.device)
            synthetic.append(flag)
        if synthesizer is None:
            synthesizer, flag = load_synthesizer(settings, self.device, self.variant)
            synthetic.append(flag)
        if speaker_encoder is None and self.cfg.use_spk:
            speaker_encoder, flag = load_speaker_encoder(settings, self.device)
            synthetic.append(flag)
        self.wavlm = wavlm.to(self.device).eval()
        self.synthesizer = synthesizer.to(self.device).eval()
        self.speaker_encoder = speaker_encoder.to(self.device).eval() if speaker_encoder is not None else None
        self.synthetic_weights = any(synthetic)
        self.load_seconds = time.perf_counter() - start
        self.speaker_cache: LRUCache[np.ndarray] = LRUCache(settings.speaker_cache_size)
        self.reference_cache: LRUCache[np.ndarray] = LRUCache(REFERENCE_CACHE_ENTRIES)
        # speech longer than chunk + 2 * context frames (30 s) goes through WavLM in windows, which bounds
        # attention memory (it grows with frames squared); shorter speech takes the exact single pass
        self.wavlm_chunk_frames = 1000
        self.wavlm_context_frames = 250
        self.speaker_embeddings_computed = 0  # how often the speaker encoder actually ran (cache misses)
        self.precision_gap: float | None = None
        if self.autocast is not None:
            self._check_autocast(keep_anyway=settings.precision != "auto")
        self._choose_fast_paths(settings)
        log.info("voice: %s on %s (precision %s), loaded in %.1f s%s", self.variant, self.device,
                 self.autocast or "fp32", self.load_seconds, " [SYNTHETIC WEIGHTS]" if self.synthetic_weights else "")

    def _choose_fast_paths(self, settings: Settings) -> None:
        """Who runs WavLM and the synthesizer: the eager modules, or their OpenVINO graphs (lipserve.fast)."""
        from ..fast import fast_synthesizer, fast_wavlm

        threads, cache = settings.cpu_threads(), settings.fast_cache_dir
        self.content_encoder, wavlm_report = fast_wavlm(self.wavlm, settings.wavlm_backend, self.device, threads, cache)
        self.synthesizer_runner, synth_report = fast_synthesizer(self.synthesizer, settings.synthesizer_backend,
                                                                 self.device, threads, cache)
        self.fast_paths = {"wavlm": wavlm_report.as_dict(), "synthesizer": synth_report.as_dict()}

    # autocast (reduced precision, a CUDA feature) applies to the eager modules; the fast graphs are CPU fp32
    def _content_runner(self):
        return self.content_encoder if self.autocast is None else self.wavlm

    def _synthesis_runner(self):
        if self.autocast is None:
            return self.synthesizer_runner
        from ..fast.networks import EagerSynthesizer

        return EagerSynthesizer(self.synthesizer)

    def autocast_gap(self, seconds: float = 1.0) -> float:
        """Max |autocast - fp32| of a deterministic test conversion with the loaded weights."""
        from ..testmedia import speechlike, tone

        speech = speechlike(seconds, CONTENT_RATE, seed=21)
        speaker = self.embed_speaker(tone(2.0, CONTENT_RATE, frequency=150.0))
        reduced = self.synthesize(self.content(speech), speaker)
        saved, self.autocast = self.autocast, None
        try:
            full = self.synthesize(self.content(speech), speaker)
        finally:
            self.autocast = saved
        return float(np.abs(reduced - full).max())

    def _check_autocast(self, keep_anyway: bool, gap: float | None = None) -> None:
        """Keep the autocast dtype if `gap` (measured now when not given) is within the tolerance."""
        self.precision_gap = self.autocast_gap() if gap is None else gap
        if self.precision_gap <= AUTOCAST_MAX_ABS_DIFF:
            log.info("voice: %s autocast within %.3g of fp32 (tolerance %.3g)", self.autocast, self.precision_gap,
                     AUTOCAST_MAX_ABS_DIFF)
        elif keep_anyway:
            log.warning("voice: %s autocast differs from fp32 by %.3g (tolerance %.3g); kept because precision "
                        "was set explicitly", self.autocast, self.precision_gap, AUTOCAST_MAX_ABS_DIFF)
        else:
            log.warning("voice: %s autocast differs from fp32 by %.3g (tolerance %.3g); using fp32",
                        self.autocast, self.precision_gap, AUTOCAST_MAX_ABS_DIFF)
            self.autocast = None

    # -- the reference voice -------------------------------------------------------------------

    def reference_from_video(self, video: bytes) -> np.ndarray:
        """The trimmed reference voice of a video, remembered by the video's hash: a returning video's
        speaker embedding is cached under the reference's own hash, so without this every request would
        decode, resample and trim the audio track again just to find that key."""
        key = content_key(video)
        reference = self.reference_cache.get(key)
        if reference is None:
            reference = reference_mod.reference_from_video(video)
            self.reference_cache.put(key, reference)
        return reference

    def reference_from_audio(self, data: bytes) -> np.ndarray:
        return reference_mod.reference_from_audio(data)

    # -- the steps -------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def content(self, speech16: np.ndarray) -> torch.Tensor:
        """WavLM features of 16 kHz speech, channels first: [1, 1024, frames] float32."""
        wav = torch.from_numpy(np.ascontiguousarray(speech16, dtype=np.float32))[None].to(self.device)
        with torch.inference_mode(), self._autocast():
            if hasattr(self.wavlm, "extract_features_chunked"):
                features = self.wavlm.extract_features_chunked(
                    wav, chunk_frames=self.wavlm_chunk_frames, context_frames=self.wavlm_context_frames,
                    extract=self._content_runner().extract_features)
            else:
                features = self._content_runner().extract_features(wav)
        return features.float().transpose(1, 2)

    def speaker_vector(self, reference: np.ndarray) -> tuple[np.ndarray, bool]:
        """([256] float32 speaker condition, cached?) for a 16 kHz trimmed reference."""
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        # FreeVC and FreeVC-24 share the speaker encoder, FreeVC-s has its own
        owner = "speaker_encoder" if self.cfg.use_spk else self.variant
        key = content_key(reference.tobytes(), owner, str(CONTENT_RATE))
        cached = self.speaker_cache.get(key)
        if cached is not None:
            return cached, True
        vector = self.embed_speaker(reference)
        self.speaker_embeddings_computed += 1
        self.speaker_cache.put(key, vector)
        return vector, False

    def embed_speaker(self, reference: np.ndarray) -> np.ndarray:
        """The speaker condition computed afresh (no cache), always in fp32 (the LSTMs are small)."""
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        if self.cfg.use_spk:
            from .speaker import embed_utterance

            return np.asarray(embed_utterance(self.speaker_encoder, reference), dtype=np.float32)
        wav = torch.from_numpy(reference)[None].to(self.device)
        with torch.inference_mode():
            mel = reference_mel(wav, self.cfg)
            return self.synthesizer.speaker_vector(mel=mel)[0].float().cpu().numpy()

    def synthesize(self, content: torch.Tensor, speaker: np.ndarray, *, deterministic: bool = True,
                   generator: torch.Generator | None = None) -> np.ndarray:
        g = torch.from_numpy(speaker)[None].to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self._synthesis_runner().infer(content, g, noise_scale=0.0 if deterministic else 1.0, generator=generator)
        return out[0, 0].float().cpu().numpy()

    # -- the whole conversion ---------------------------------------------------------------------

    def convert(self, speech: np.ndarray, sample_rate: int, reference: np.ndarray, *,
                deterministic: bool = True) -> VoiceResult:
        """`speech` (mono, any rate) in the voice of `reference` (16 kHz, trimmed: see reference_from_*).

        Output: float32 at cfg.output_sample_rate, exactly as long as the source speech.
        """
        speech = np.asarray(speech, dtype=np.float32).reshape(-1)
        if speech.size == 0 or not np.isfinite(speech).all():
            raise InvalidAudio("the speech to convert is empty or contains non-finite samples")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if sample_rate != CONTENT_RATE:
            speech = librosa.resample(speech, orig_sr=sample_rate, target_sr=CONTENT_RATE).astype(np.float32)
        timings["resample"] = time.perf_counter() - start
        if speech.size < MIN_SPEECH_SAMPLES:
            raise InvalidAudio(f"the speech to convert is {speech.size / CONTENT_RATE * 1000:.0f} ms long; "
                               f"voice conversion needs at least {MIN_SPEECH_SAMPLES / CONTENT_RATE * 1000:.0f} ms")

        start = time.perf_counter()
        content = self.content(speech)
        timings["wavlm"] = time.perf_counter() - start

        start = time.perf_counter()
        speaker, cached = self.speaker_vector(reference)
        timings["speaker_embedding"] = time.perf_counter() - start

        start = time.perf_counter()
        audio = self.synthesize(content, speaker, deterministic=deterministic)
        timings["synthesis"] = time.perf_counter() - start

        out_rate = self.cfg.output_sample_rate
        target = int(round(speech.size * out_rate / CONTENT_RATE))
        audio = audio[:target] if audio.size >= target else np.pad(audio, (0, target - audio.size))
        return VoiceResult(np.ascontiguousarray(audio, dtype=np.float32), out_rate, cached, timings, self.synthetic_weights)

    def describe(self) -> dict:
        return {
            "variant": self.variant,
            "device": str(self.device),
            "precision": str(self.autocast).replace("torch.", "") if self.autocast else "fp32",
            "sample_rate": self.cfg.output_sample_rate,
            "synthetic_weights": self.synthetic_weights,
            "load_seconds": round(self.load_seconds, 3),
            "autocast_max_abs_diff": self.precision_gap,
            "fast_paths": self.fast_paths,
            "speaker_cache": self.speaker_cache.stats(),
        }
