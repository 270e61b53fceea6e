"""VoiceConverter: the TTS speech in the user's own voice (FreeVC), with models loaded once.

Per request, as FreeVC's `convert.py` does it: 16 kHz source -> WavLM-Large last-layer
features (content) -> speaker vector of the silence-trimmed reference (the speaker encoder's
utterance embedding; FreeVC-s: its own mel encoder) -> SynthesizerTrn.infer.

The prior is sampled with noise at scale 1, as convert.py does, so each conversion differs
slightly. What we add: the speaker vector is cached by the reference's content hash, so a
returning video skips the speaker encoder; `deterministic=True` switches the prior's noise off
(an opt-in: not what FreeVC produces) so a repeated request gives identical audio; `seed` draws
the noise from a generator of its own (same seed, same audio in any process); long speech goes
through WavLM in windows; the output is cut or zero-padded to exactly the source duration (the
official output can fall up to 399 samples short, as WavLM drops the last partial frame); the
result carries the precision that ran, a voice-similarity figure and warnings about a thin
reference.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import librosa
import numpy as np
import torch

from .. import heap
from ..cache import LRUCache, content_key
from ..errors import InvalidAudio
from ..gpu import first_that_fits
from ..media import SourceVideo
from ..models.freevc_configs import freevc_config
from ..runtime import ModelRuntime, OnRuntime
from ..settings import Settings
from ..weights.resolve import load_concurrently
from . import reference as reference_mod
from .synthesizer import load_synthesizer, reference_mel

log = logging.getLogger("lipserve.voice")

CONTENT_RATE = 16000  # WavLM and the speaker encoder both take 16 kHz
MIN_SPEECH_SAMPLES = 400  # one WavLM frame
REFERENCE_CACHE_ENTRIES = 32  # trimmed reference voices by video hash (up to 60 s x 64 kB/s = 3.8 MB each)
# Reduced precision (CUDA autocast) is kept only while, at load, converting real speech (two TTS
# sentences) with noise off differs from fp32 by at most this much: the RMS of the difference waveform,
# in dB re full scale; otherwise precision "auto" falls back to fp32. Why -60: it is 40 dB under the
# speech (the TTS delivers -20 dBFS), about the error the delivered file carries anyway, as the AAC
# encoder's own coding error on that speech measured -62 dBFS RMS here. Measured with CPU autocast (the
# same casts) on synthetic weights, WavLM-Large + FreeVC, 2.7 s of piper speech: fp16 -66.2 dBFS (peak
# -52.9), bf16 -48.7 dBFS (peak -34.7), so bf16 falls back. Not yet measured on a GPU or real weights;
# the check runs at every load, so real checkpoints are judged on their own figures.
AUTOCAST_MAX_GAP_DBFS = -60.0
# the precision check's input: two offline-TTS sentences (speech, reference), one per channel
# (written by devtools/make_voice_probe.py), so the voice stage never builds a TTS engine for it
PRECISION_SPEECH = Path(__file__).parent / "assets" / "precision_speech.flac"
FLOOR_DBFS = -200.0  # what an exact match reads as (keeps the figures finite, for JSON)


def dbfs(x: np.ndarray) -> float:
    """RMS level in dB re full scale (1.0), floored at FLOOR_DBFS."""
    power = float(np.mean(np.square(np.asarray(x, dtype=np.float64)))) if np.size(x) else 0.0
    return max(FLOOR_DBFS, 10 * np.log10(power)) if power > 0 else FLOOR_DBFS


@dataclass
class PrecisionGap:
    """How far a reduced-precision conversion lies from fp32 (dBFS of the difference waveform)."""

    rms_dbfs: float
    peak_dbfs: float
    probe: str  # what was converted: "piper:<voice>", "espeak:<voice>" or "speech-like test signal"
    finite: bool = True

    def within(self, limit_dbfs: float) -> bool:
        return self.finite and self.rms_dbfs <= limit_dbfs


def probe_speech() -> tuple[np.ndarray, np.ndarray, str]:
    """(speech, reference, what) for the precision check: 16 kHz mono float32, trailing padding trimmed."""
    import soundfile

    both, rate = soundfile.read(PRECISION_SPEECH, dtype="float32", always_2d=True)
    assert rate == CONTENT_RATE, f"{PRECISION_SPEECH} is {rate} Hz, not {CONTENT_RATE}"
    speech, reference = (np.trim_zeros(both[:, k], "b") for k in (0, 1))
    return np.ascontiguousarray(speech), np.ascontiguousarray(reference), f"recorded TTS speech ({PRECISION_SPEECH.name})"


@dataclass
class VoiceResult:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int  # 16000 (24000 for freevc-24)
    speaker_cached: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds: resample, wavlm, speaker_embedding, synthesis, similarity, release_memory
    synthetic_weights: bool = False
    precision: str = "fp32"  # what the networks ran in: fp32, fp16 or bf16 (autocast)
    # cosine between the reference's speaker embedding and the converted speech's (same encoder)
    voice_similarity: float | None = None
    warnings: list[str] = field(default_factory=list)  # about the reference voice


class VoiceConverter(OnRuntime):
    def __init__(self, settings: Settings, *, wavlm=None, speaker_encoder=None, synthesizer=None,
                 given_models_synthetic: bool = False, gpu_share: float | None = None):
        """Loads WavLM, the SynthesizerTrn variant and (FreeVC, FreeVC-24) the speaker encoder once.

        Already loaded models may be passed in (tests, sharing between converters); say with
        `given_models_synthetic` whether any of them carries synthetic weights. `gpu_share` is the
        replica's GPU fraction (Ray's num_gpus): it caps this process's CUDA memory (lipserve.gpu).
        """
        self.settings = settings
        self.variant = settings.voice.freevc_variant
        self.cfg = freevc_config(self.variant)
        self.runtime = ModelRuntime(settings.runtime, gpu_share)
        from .loaders import load_speaker_encoder, load_wavlm  # written beside this module

        start = time.perf_counter()
        loaders = {}
        if wavlm is None:
            loaders["wavlm"] = lambda: load_wavlm(settings, self.device)
        if synthesizer is None:
            loaders["synthesizer"] = lambda: load_synthesizer(settings, self.device, self.variant)
        if speaker_encoder is None and self.cfg.use_spk:
            loaders["speaker_encoder"] = lambda: load_speaker_encoder(settings, self.device)
        loaded, self.load_timings = load_concurrently(loaders)
        synthetic = [given_models_synthetic] + [flag for _, flag in loaded.values()]
        wavlm = loaded["wavlm"][0] if "wavlm" in loaded else wavlm
        synthesizer = loaded["synthesizer"][0] if "synthesizer" in loaded else synthesizer
        speaker_encoder = loaded["speaker_encoder"][0] if "speaker_encoder" in loaded else speaker_encoder
        self.wavlm = wavlm.to(self.device).eval()
        self.synthesizer = synthesizer.to(self.device).eval()
        self.speaker_encoder = speaker_encoder.to(self.device).eval() if speaker_encoder is not None else None
        self.synthetic_weights = any(synthetic)
        self.load_seconds = time.perf_counter() - start
        self.speaker_cache: LRUCache[np.ndarray] = LRUCache(settings.voice.speaker_cache_size)
        self.reference_cache: LRUCache[np.ndarray] = LRUCache(REFERENCE_CACHE_ENTRIES)
        # speech longer than chunk + 2 * context frames (30 s) goes through WavLM in windows, which bounds
        # attention memory (it grows with frames squared); shorter speech takes the exact single pass
        self.wavlm_chunk_frames = 1000
        self.wavlm_context_frames = 250
        self.speaker_embeddings_computed = 0  # how often the speaker encoder actually ran (cache misses)
        self.warm_up_report: dict[str, float] | None = None  # set by warm_up()
        self.precision_gap: PrecisionGap | None = None
        self._choose_fast_paths(settings)  # before the autocast check: its fp32 side runs through the runners
        if self.autocast is not None:
            self._check_autocast()
        log.info("voice: %s on %s (precision %s), loaded in %.1f s%s", self.variant, self.device,
                 self.autocast or "fp32", self.load_seconds, " [SYNTHETIC WEIGHTS]" if self.synthetic_weights else "")

    def _choose_fast_paths(self, settings: Settings) -> None:
        """Who runs WavLM and the synthesizer: the eager modules, or their OpenVINO graphs (lipserve.fast)."""
        from ..fast import fast_synthesizer, fast_wavlm

        self.content_encoder, wavlm_report = self.runtime.fast(fast_wavlm, self.wavlm, settings.voice.wavlm_backend)
        self.synthesizer_runner, synth_report = self.runtime.fast(fast_synthesizer, self.synthesizer,
                                                                  settings.voice.synthesizer_backend)
        self.fast_paths = {"wavlm": wavlm_report.as_dict(), "synthesizer": synth_report.as_dict()}

    # autocast (reduced precision, a CUDA feature) applies to the eager modules; the fast graphs are CPU fp32
    def _content_runner(self):
        return self.content_encoder if self.autocast is None else self.wavlm

    def _synthesis_runner(self):
        if self.autocast is None:
            return self.synthesizer_runner
        from ..fast.networks import EagerSynthesizer

        return EagerSynthesizer(self.synthesizer)

    def autocast_gap(self, probe: tuple[np.ndarray, np.ndarray, str] | None = None) -> PrecisionGap:
        """The current autocast dtype against fp32, on real speech (`probe_speech`) converted with noise off."""
        speech, reference, what = probe if probe is not None else probe_speech()
        speaker = self.embed_speaker(reference_mod.trim_silence(reference))
        reduced = self.synthesize(self.content(speech), speaker, deterministic=True)
        saved, self.autocast = self.autocast, None
        try:
            full = self.synthesize(self.content(speech), speaker, deterministic=True)
        finally:
            self.autocast = saved
        if not np.isfinite(reduced).all():  # an fp16 overflow: no figure, and never kept
            return PrecisionGap(rms_dbfs=0.0, peak_dbfs=0.0, probe=what, finite=False)
        difference = reduced.astype(np.float64) - full
        peak = float(np.abs(difference).max())
        return PrecisionGap(rms_dbfs=dbfs(difference), peak_dbfs=max(FLOOR_DBFS, 20 * np.log10(peak)) if peak > 0
                            else FLOOR_DBFS, probe=what)

    def _check_autocast(self, keep_anyway: bool | None = None, gap: PrecisionGap | None = None) -> None:
        """Keep the autocast dtype if `gap` (measured now when not given) is within the tolerance."""
        self.precision_gap = self.autocast_gap() if gap is None else gap
        gap = self.precision_gap
        figures = (f"{self.autocast} autocast differs from fp32 by {gap.rms_dbfs:.1f} dBFS RMS (peak "
                   f"{gap.peak_dbfs:.1f} dBFS)" if gap.finite else f"{self.autocast} autocast gives non-finite audio")
        figures += f" on {gap.probe}; tolerance {AUTOCAST_MAX_GAP_DBFS:g} dBFS RMS"
        self.runtime.settle_autocast("voice", figures, gap.within(AUTOCAST_MAX_GAP_DBFS), usable=gap.finite,
                                     keep_anyway=keep_anyway)

    @property
    def precision_name(self) -> str:
        return self.runtime.precision_name

    # -- the reference voice -------------------------------------------------------------------

    def reference_from_video(self, video: SourceVideo | bytes, *, use_cache: bool = True) -> np.ndarray:
        """The trimmed reference voice of a video, remembered by the video's hash (its SourceVideo's key):
        a returning video's speaker embedding is cached under the reference's own hash, so without this
        every request would decode, resample and trim the audio track again just to find that key.
        `use_cache=False` neither reads nor fills that memory (the warm-up)."""
        data, key = (video.data, video.key) if isinstance(video, SourceVideo) else (video, content_key(video))
        reference = self.reference_cache.get(key) if use_cache else None
        if reference is None:
            reference = reference_mod.reference_from_video(data)
            if use_cache:
                self.reference_cache.put(key, reference)
        return reference

    def reference_from_audio(self, data: bytes) -> np.ndarray:
        return reference_mod.reference_from_audio(data)

    # -- the steps -------------------------------------------------------------------------------

    def content(self, speech16: np.ndarray) -> torch.Tensor:
        """WavLM features of 16 kHz speech, channels first: [1, 1024, frames] float32."""
        wav = torch.from_numpy(np.ascontiguousarray(speech16, dtype=np.float32))[None].to(self.device)

        def extract(chunk_frames: int, context_frames: int):
            with torch.inference_mode(), self.runtime.autocast_context():
                if hasattr(self.wavlm, "extract_features_chunked"):
                    return self.wavlm.extract_features_chunked(
                        wav, chunk_frames=chunk_frames, context_frames=context_frames,
                        extract=self._content_runner().extract_features)
                return self._content_runner().extract_features(wav)

        # out of GPU memory: shorter windows (attention memory grows with their length squared)
        frames = max(1, speech16.size // 320)
        windows = [(self.wavlm_chunk_frames, self.wavlm_context_frames)]
        while windows[-1][0] > 100 and frames > 100:
            chunk = max(100, min(windows[-1][0], frames) // 2)
            windows.append((chunk, min(self.wavlm_context_frames, chunk // 4)))
        features = first_that_fits([lambda c=c, x=x: extract(c, x) for c, x in windows], self.device, "WavLM")
        return features.float().transpose(1, 2)

    def speaker_vector(self, reference: np.ndarray, *, use_cache: bool = True) -> tuple[np.ndarray, bool]:
        """([256] float32 speaker condition, cached?) for a 16 kHz trimmed reference."""
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        # FreeVC and FreeVC-24 share the speaker encoder, FreeVC-s has its own
        owner = "speaker_encoder" if self.cfg.use_spk else self.variant
        key = content_key(reference.tobytes(), owner, str(CONTENT_RATE))
        cached = self.speaker_cache.get(key) if use_cache else None
        if cached is not None:
            return cached, True
        vector = self.embed_speaker(reference)
        self.speaker_embeddings_computed += 1
        if use_cache:
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

    def synthesize(self, content: torch.Tensor, speaker: np.ndarray, *, deterministic: bool = False,
                   generator: torch.Generator | None = None) -> np.ndarray:
        g = torch.from_numpy(speaker)[None].to(self.device)

        def infer():
            with torch.inference_mode(), self.runtime.autocast_context():
                return self._synthesis_runner().infer(content, g, noise_scale=0.0 if deterministic else 1.0,
                                                      generator=generator)

        # out of GPU memory: once more from an emptied cache, then a 503 (never a 500)
        out = first_that_fits([infer, infer], self.device, "FreeVC synthesis")
        return out[0, 0].float().cpu().numpy()

    # -- the whole conversion ---------------------------------------------------------------------

    def convert(self, speech: np.ndarray, sample_rate: int, reference: np.ndarray, *,
                deterministic: bool = False, seed: int | None = None, use_cache: bool = True) -> VoiceResult:
        """`speech` (mono, any rate) in the voice of `reference` (16 kHz, trimmed: see reference_from_*).

        Output: float32 at cfg.output_sample_rate, exactly as long as the source speech.
        `use_cache=False` neither reads nor fills the speaker-embedding cache (the warm-up).
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
        speaker, cached = self.speaker_vector(reference, use_cache=use_cache)
        timings["speaker_embedding"] = time.perf_counter() - start

        start = time.perf_counter()
        # without a seed the noise comes from torch's global generator, as in convert.py
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        audio = self.synthesize(content, speaker, deterministic=deterministic, generator=generator)
        timings["synthesis"] = time.perf_counter() - start

        out_rate = self.cfg.output_sample_rate
        target = int(round(speech.size * out_rate / CONTENT_RATE))
        audio = audio[:target] if audio.size >= target else np.pad(audio, (0, target - audio.size))

        start = time.perf_counter()
        similarity = self.similarity(speaker, audio, out_rate)
        timings["similarity"] = time.perf_counter() - start
        # this request's buffers are freed by now; their pages go back to the system (lipserve.heap)
        start = time.perf_counter()
        heap.trim()
        timings["release_memory"] = time.perf_counter() - start
        return VoiceResult(np.ascontiguousarray(audio, dtype=np.float32), out_rate, cached, timings,
                           self.synthetic_weights, precision=self.precision_name, voice_similarity=similarity,
                           warnings=reference_mod.reference_warnings(reference))

    def similarity(self, speaker: np.ndarray, audio: np.ndarray, sample_rate: int) -> float | None:
        """Cosine between a reference's speaker condition and the embedding of converted speech, by the
        encoder already loaded (FreeVC's speaker encoder; FreeVC-s's own mel encoder); None if silent."""
        wav = np.asarray(audio, dtype=np.float32)
        if sample_rate != CONTENT_RATE:
            wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=CONTENT_RATE).astype(np.float32)
        wav = reference_mod.trim_silence(wav)  # as the reference was
        if wav.size < MIN_SPEECH_SAMPLES or not np.abs(wav).max() > 0:
            return None
        embedding = self.embed_speaker(wav)
        norms = float(np.linalg.norm(speaker) * np.linalg.norm(embedding))
        return round(float(np.dot(speaker, embedding)) / norms, 4) if norms > 0 else None

    def preload(self) -> None:
        """Nothing is lazy here: the networks load in the constructor."""

    def warm_up(self, seconds: float | None = None, inputs=None) -> dict[str, float]:
        """Every path of a request once, on synthetic inputs (lipserve.warmup): the reference voice
        from a video's audio track and from an audio file (decode, the voiced-speech check and the
        trim: librosa's lazily imported modules), then `convert` with its defaults (WavLM, the speaker
        embedding, synthesis). The speaker cache is left untouched. Returns seconds per path."""
        from ..warmup import WarmupReport, warmup_inputs

        inputs = inputs or warmup_inputs(seconds or self.settings.runtime.warmup_seconds)
        report = WarmupReport()
        with report.path("reference_from_video"):
            reference = self.reference_from_video(inputs.video, use_cache=False)
        with report.path("reference_from_audio"):
            self.reference_from_audio(inputs.video)
        with report.path("convert"):
            result = self.convert(np.array(inputs.speech), inputs.sample_rate, reference, use_cache=False)
        report.update({f"convert.{step}": round(seconds, 4) for step, seconds in result.timings.items()})
        self.warm_up_report = dict(report)
        return self.warm_up_report

    def describe(self) -> dict:
        return {
            "variant": self.variant,
            "device": str(self.device),
            "precision": self.precision_name,
            "sample_rate": self.cfg.output_sample_rate,
            "synthetic_weights": self.synthetic_weights,
            "load_seconds": round(self.load_seconds, 3),
            # reduced precision against fp32 at load (CUDA only): dBFS of the difference, and on what
            "precision_gap": None if self.precision_gap is None else {
                "rms_dbfs": round(self.precision_gap.rms_dbfs, 1) if self.precision_gap.finite else None,
                "peak_dbfs": round(self.precision_gap.peak_dbfs, 1) if self.precision_gap.finite else None,
                "probe": self.precision_gap.probe, "tolerance_dbfs": AUTOCAST_MAX_GAP_DBFS},
            "fast_paths": self.fast_paths,
            "load_timings": {name: round(seconds, 3) for name, seconds in self.load_timings.items()},
            "warm_up": self.warm_up_report,
            "speaker_cache": self.speaker_cache.stats(),
        }
