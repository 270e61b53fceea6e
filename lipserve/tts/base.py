"""What every speech engine offers, the result type, and language-code matching."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class SpeechResult:
    audio: np.ndarray  # float32 mono, 16 kHz, trimmed, loudness-normalised
    sample_rate: int  # 16000
    engine: str
    voice: str
    language: str  # the engine's code for the language it spoke (e.g. "en-us")
    cached: bool
    fallbacks: list[str] = field(default_factory=list)  # e.g. ["gtts: unreachable (...)"]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class EngineAudio:
    """Raw engine output, before resampling / trimming / loudness."""

    samples: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int


def normalize_language(code: str) -> str:
    """'en_US' / 'EN-us' / ' en-us ' -> 'en-us' (codes are compared this way everywhere)."""
    return code.strip().replace("_", "-").lower()


def match_language(requested: str, offered: Iterable[str]) -> str | None:
    """The offered code that serves `requested`: exact first, then same base language.

    'en' is served by 'en-us'; 'en-au' by 'en' (or by 'en-gb', 'en-us', in offered order)
    when no exact 'en-au' exists. `offered` order is the engine's preference.
    """
    want = normalize_language(requested)
    if not want:
        return None
    offered = [normalize_language(c) for c in offered]
    if want in offered:
        return want
    base = want.split("-")[0]
    if base in offered:
        return base
    for code in offered:
        if code.split("-")[0] == base:
            return code
    return None


class TTSEngine(ABC):
    """One speech engine. Engines raise TTSUnavailable for failures of the backend itself."""

    name: str = ""
    online: bool = False  # needs the internet (never called by a warm-up)
    _reason: str | None = None  # why the engine cannot be used here; None = usable

    @property
    def available(self) -> bool:
        """Usable in this process (installed, voices found)."""
        return self.unavailable_reason is None

    @property
    def unavailable_reason(self) -> str | None:
        return self._reason

    @abstractmethod
    def languages(self) -> list[str]:
        """Normalised language codes, in the engine's order of preference."""

    @abstractmethod
    def voice_for(self, language: str) -> tuple[str, str] | None:
        """(voice name, matched language code) for a requested language; None if unsupported."""

    @abstractmethod
    def synthesize(self, text: str, voice: str, language: str, seed: int | None = None) -> EngineAudio:
        """Speak already-normalised text with a voice from voice_for().

        `seed`: an engine that draws random numbers (piper) draws them from it, so the same seed
        gives the same audio in any process; without it, it behaves as the engine itself does.
        Deterministic engines ignore it."""

    def warmup_languages(self) -> list[str]:
        """Languages whose voices a warm-up speaks once: by default the first (one voice is enough
        when every voice runs the same way, e.g. one subprocess per call)."""
        return self.languages()[:1]

    def describe(self) -> dict:
        return {
            "available": self.available,
            "reason": self.unavailable_reason,
            "languages": self.languages() if self.available else [],
        }
