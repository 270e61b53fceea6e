"""Speech stage: text in a language -> 16 kHz mono float32 speech, with engine choice.

Engines: `piper` (offline neural, voices in packages / weights_dir), `espeak` (espeak-ng,
many languages, optional), `gtts` (Google, needs the internet). `auto` walks
`settings.speech.tts_order`, skipping engines that are not available or do not speak the
language, and falls back on backend failures, recording each in `SpeechResult.fallbacks`.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping

from lipserve.cache import LRUCache
from lipserve.errors import InvalidField, TextTooLong, TTSUnavailable, UnsupportedLanguage
import torch

from lipserve.settings import Settings
from lipserve.tts.base import EngineAudio, SpeechResult, TTSEngine, normalize_language
from lipserve.tts.postprocess import TARGET_RATE, finish
from lipserve.tts.text import normalize_text

__all__ = ["SpeechSynthesizer", "SpeechResult", "TTSEngine", "EngineAudio", "ENGINE_NAMES"]

log = logging.getLogger(__name__)

ENGINE_NAMES = ("piper", "espeak", "gtts")
# after gtts fails, `auto` skips it this long instead of paying its timeout on every request
GTTS_COOLDOWN_S = 30.0


def build_engines(settings: Settings) -> dict[str, TTSEngine]:
    from lipserve.tts.espeak_engine import EspeakEngine
    from lipserve.tts.gtts_engine import GTTSEngine
    from lipserve.tts.piper_engine import PiperEngine

    return {
        "piper": PiperEngine(settings.runtime.weights_dir, threads=settings.runtime.torch_threads),
        "espeak": EspeakEngine(timeout_s=settings.speech.tts_timeout_s),
        "gtts": GTTSEngine(timeout_s=settings.speech.tts_timeout_s),
    }


def _list_languages(per_engine: Mapping[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(codes) or '(none)'}" for name, codes in per_engine.items())


class SpeechSynthesizer:
    """A Stage (lipserve.runtime): its engines run on the CPU and carry no synthetic weights."""

    device = torch.device("cpu")
    synthetic_weights = False

    def __init__(self, settings: Settings, *, engines: Mapping[str, TTSEngine] | None = None):
        self.settings = settings
        self.engines: dict[str, TTSEngine] = dict(engines) if engines is not None else build_engines(settings)
        unknown = [e for e in settings.speech.tts_order if e not in self.engines]
        if unknown:
            raise ValueError(f"tts_order names unknown engines {unknown}; known: {sorted(self.engines)}")
        self.order = list(settings.speech.tts_order)
        self.cache: LRUCache[SpeechResult] = LRUCache(settings.speech.tts_cache_size)
        self.warm_up_report: dict | None = None  # set by warm_up()
        for name, engine in self.engines.items():
            if not engine.available:
                log.info("tts engine %s unavailable: %s", name, engine.unavailable_reason)

    # ---- introspection -------------------------------------------------------------

    def available_engines(self) -> list[str]:
        return [name for name, engine in self.engines.items() if engine.available]

    def languages(self) -> dict[str, list[str]]:
        """Available engine -> the language codes it speaks."""
        return {name: self.engines[name].languages() for name in self.available_engines()}

    def describe(self) -> dict:
        return {
            "order": self.order,
            "available": self.available_engines(),
            "engines": {name: engine.describe() for name, engine in self.engines.items()},
            "cache": self.cache.stats(),
            "warm_up": self.warm_up_report,
        }

    def preload(self) -> None:
        """Load what loads lazily (piper's ONNX sessions), so the first request is not slow."""
        for engine in self.engines.values():
            if engine.available and hasattr(engine, "preload"):
                engine.preload()

    def warm_up(self, seconds: float | None = None, inputs=None) -> dict[str, float]:
        """Speak a short line once per voice a request can reach, through `synthesize`: the ONNX
        session's first run, the engine's start and the resampling are paid here, not by the first
        request. Online engines (gtts) are not called: a start must not depend on the network.
        The cache is left untouched. Returns seconds per engine:language. (`seconds` and `inputs`
        are the other stages' warm-up size and clip; a short line serves every size here.)"""
        from lipserve.warmup import WARMUP_TEXT, WarmupReport

        self.preload()
        report, failed = WarmupReport(), []
        for name in self.available_engines():
            engine = self.engines[name]
            if engine.online:
                continue
            for language in dict.fromkeys(engine.warmup_languages()):
                try:
                    with report.path(f"{name}:{language}"):
                        self.synthesize(WARMUP_TEXT, language, name, use_cache=False)
                except TTSUnavailable as exc:
                    # the stage still starts: `auto` falls back past a failing engine, as it would for a request
                    log.warning("tts warm-up: %s (%s) failed: %s", name, language, exc.message)
                    failed.append(f"{name}:{language}: {exc.message}")
        self.warm_up_report = {**report, **({"failed": failed} if failed else {})}
        return self.warm_up_report

    # ---- synthesis -----------------------------------------------------------------

    def _candidates(self, engine: str) -> list[str]:
        if engine == "auto":
            return [name for name in self.order if self.engines[name].available]
        if engine not in self.engines:
            raise InvalidField(f"unknown TTS engine {engine!r}; choose auto or one of: "
                               f"{', '.join(self.available_engines()) or '(none available)'}",
                               field="tts_engine")
        if not self.engines[engine].available:
            raise InvalidField(f"TTS engine {engine!r} is not available here "
                               f"({self.engines[engine].unavailable_reason}); available: "
                               f"auto, {', '.join(self.available_engines()) or '(none)'}",
                               field="tts_engine")
        return [engine]

    def synthesize(self, text: str, language: str = "en", engine: str = "auto", seed: int | None = None, *,
                   use_cache: bool = True) -> SpeechResult:
        """Speech for `text`; with `seed`, the same audio in any process (see TTSEngine.synthesize)."""
        text = normalize_text(text, self.settings.limits.max_text_chars)
        language = normalize_language(language or "")
        engine = (engine or "auto").strip().lower()
        candidates = self._candidates(engine)

        # who can speak this language at all
        plans = []
        for name in candidates:
            found = self.engines[name].voice_for(language)
            if found:
                plans.append((name, *found))
        if not plans:
            per_engine = {name: self.engines[name].languages() for name in candidates}
            scope = "any available TTS engine" if engine == "auto" else f"the {engine} engine"
            raise UnsupportedLanguage(f"language {language!r} is not supported by {scope}; "
                                      f"available languages: {_list_languages(per_engine)}",
                                      field="tts_lang")

        fallbacks: list[str] = []
        for i, (name, voice, matched) in enumerate(plans):
            # a seeded result is one fixed draw, an unseeded one any draw: never serve one for the other
            key = "\0".join((name, voice, matched, text, "" if seed is None else str(seed)))
            hit = self.cache.get(key) if use_cache else None
            if hit is not None:
                return SpeechResult(audio=hit.audio.copy(), sample_rate=hit.sample_rate, engine=name,
                                    voice=voice, language=matched, cached=True, fallbacks=fallbacks)
            last = self._recent_failure(name) if engine == "auto" and i < len(plans) - 1 else None
            if last is not None:
                fallbacks.append(f"{name}: skipped, failed {last[0]:.0f} s ago ({last[1]})")
                continue
            try:
                raw = self.engines[name].synthesize(text, voice, matched, seed=seed)
            except TTSUnavailable as e:
                log.warning("tts engine %s failed: %s", name, e.message)
                fallbacks.append(e.message if e.message.startswith(f"{name}:") else f"{name}: {e.message}")
                continue
            audio = finish(raw)
            if audio.size == 0:
                fallbacks.append(f"{name}: produced only silence")
                continue
            seconds = audio.size / TARGET_RATE
            if seconds > self.settings.limits.max_speech_seconds:
                raise TextTooLong(f"the speech would last {seconds:.1f} s; the limit is "
                                  f"{self.settings.limits.max_speech_seconds:g} s: shorten the text", field="word")
            audio.flags.writeable = False  # the cached copy is shared; callers get copies
            if use_cache:
                self.cache.put(key, SpeechResult(audio=audio, sample_rate=TARGET_RATE, engine=name, voice=voice,
                                                 language=matched, cached=False))
            return SpeechResult(audio=audio.copy(), sample_rate=TARGET_RATE, engine=name, voice=voice,
                                language=matched, cached=False, fallbacks=fallbacks)
        raise TTSUnavailable("no TTS engine could speak the text: " + "; ".join(fallbacks))

    def _recent_failure(self, name: str) -> tuple[float, str] | None:
        """(seconds ago, message) when `name` failed within the cooldown (gtts only)."""
        failure = getattr(self.engines[name], "last_failure", None)
        if failure is None:
            return None
        ago = time.monotonic() - failure[0]
        return (ago, failure[1]) if ago < GTTS_COOLDOWN_S else None
