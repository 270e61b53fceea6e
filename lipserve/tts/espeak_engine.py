"""espeak-ng (formant synthesis) for the many languages no local neural voice covers, Korean
included. Optional: detected at start with shutil.which; languages from `espeak-ng --voices`."""
from __future__ import annotations

import logging
import shutil
import subprocess

from lipserve.errors import TTSUnavailable
from lipserve.tts.base import EngineAudio, TTSEngine, match_language, normalize_language
from lipserve.tts.postprocess import parse_wav

log = logging.getLogger(__name__)


def parse_voice_list(listing: str) -> dict[str, str]:
    """`espeak-ng --voices` table -> {language code: voice to pass to -v}.

    Each row: priority, language, age/gender, name, file, then "(other-language priority)"
    pairs. A code served by several voices goes to the one with the lowest priority number
    (espeak's own preference), so 'en' -> 'en-gb' (priority 2) rather than 'en-029'.
    """
    best: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 5 or not parts[0].isdigit():
            continue
        priority, language = int(parts[0]), parts[1]
        offers = [(normalize_language(language), priority)]
        rest = " ".join(parts[5:])
        for item in rest.replace(")", " ").split("("):
            bits = item.split()
            if len(bits) == 2 and bits[1].isdigit():
                offers.append((normalize_language(bits[0]), int(bits[1])))
        for code, prio in offers:
            if code not in best or prio < best[code][0]:
                best[code] = (prio, language)
    return {code: voice for code, (prio, voice) in sorted(best.items())}


class EspeakEngine(TTSEngine):
    name = "espeak"

    def __init__(self, timeout_s: float = 10.0, binary: str = "espeak-ng"):
        self.timeout_s = timeout_s
        self.binary = shutil.which(binary)
        self._voices: dict[str, str] = {}
        self._reason: str | None = None
        if self.binary is None:
            self._reason = f"{binary} is not installed (Debian/Ubuntu: apt-get install espeak-ng)"
            return
        try:
            listing = subprocess.run([self.binary, "--voices"], capture_output=True, text=True,
                                     timeout=timeout_s, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            self._reason = f"{self.binary} --voices failed: {e}"
            return
        self._voices = parse_voice_list(listing)
        if not self._voices:
            self._reason = f"{self.binary} --voices listed no voices"

    def languages(self) -> list[str]:
        return list(self._voices)

    def voice_for(self, language: str) -> tuple[str, str] | None:
        if not self.available:
            return None
        matched = match_language(language, self._voices)
        return (self._voices[matched], matched) if matched else None

    def synthesize(self, text: str, voice: str, language: str, seed: int | None = None) -> EngineAudio:
        if not self.available:
            raise TTSUnavailable(f"espeak unavailable: {self._reason}")
        # text on stdin (never argv: a leading '-' would read as an option); -b 1 = UTF-8
        cmd = [self.binary, "-v", voice, "-b", "1", "--stdin", "--stdout"]
        try:
            proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise TTSUnavailable(f"espeak-ng took longer than {self.timeout_s:g} s") from e
        except OSError as e:
            raise TTSUnavailable(f"espeak-ng could not run: {e}") from e
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[:300]
            raise TTSUnavailable(f"espeak-ng exited with {proc.returncode}: {err}")
        try:
            return parse_wav(proc.stdout)
        except ValueError as e:
            raise TTSUnavailable(f"espeak-ng gave unreadable audio: {e}") from e

    def describe(self) -> dict:
        d = super().describe()
        d["binary"] = self.binary
        return d
