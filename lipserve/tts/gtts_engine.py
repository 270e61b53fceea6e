"""Google Translate's TTS through the gTTS package, as the old server used it.

gTTS builds one POST per <=100-character chunk to
`https://translate.google.<tld>/_/TranslateWebserverUi/data/batchexecute` with `requests`
and answers 24 kHz MP3. Left alone it has no timeout; here every call has a deadline:
  * each attempt passes gTTS a (connect, read) timeout no longer than the time left;
  * the attempt runs in a daemon thread we stop waiting for at the deadline, so even a
    server that trickles bytes (which a per-read timeout never catches) cannot hang us;
  * one retry, only for transient failures (connection refused/reset, HTTP 5xx) and only
    if time is left; a timeout has used the budget, so it is not retried.
Every failure becomes TTSUnavailable (502) naming the cause.
"""
from __future__ import annotations

import logging
import threading
import time

import requests

from lipserve.errors import InvalidAudio, TTSUnavailable
from lipserve.media import decode_audio_bytes
from lipserve.tts.base import EngineAudio, TTSEngine, match_language, normalize_language
from lipserve.tts.postprocess import TARGET_RATE

log = logging.getLogger(__name__)

_GRACE_S = 1.0  # beyond the deadline, time for a thread whose socket already timed out to report


class _Attempt:
    """Outcome of one gTTS call: mp3 bytes, or the error and whether a retry may help."""

    def __init__(self):
        self.mp3: bytes | None = None
        self.error: str | None = None
        self.transient = False
        self.exc: BaseException | None = None


def _describe_gtts_error(err: Exception, timeout_s: float) -> tuple[str, bool]:
    """(message, transient) for a gTTSError, using the requests exception it was raised from."""
    response = getattr(err, "rsp", None)
    if response is not None:
        status = response.status_code
        if status >= 500:
            return f"HTTP {status} from Google TTS ({err})", True
        if status == 429:
            return f"rate limited by Google TTS (HTTP 429: {err})", False
        if status < 400:
            return f"Google TTS answered without audio (HTTP {status}: {err})", False
        return f"Google TTS refused the request (HTTP {status}: {err})", False
    cause = err.__context__  # gTTS raises its error inside `except RequestException`
    if isinstance(cause, requests.exceptions.Timeout):
        return f"unreachable: no answer within {timeout_s:.3g} s ({type(cause).__name__})", False
    if isinstance(cause, requests.exceptions.RequestException):
        return f"unreachable: cannot connect ({_root_cause(cause)})", True
    return f"unreachable: {err}", True


def _root_cause(exc: BaseException) -> str:
    """'NameResolutionError: Failed to resolve ...' from requests' nested connection errors."""
    inner = exc.args[0] if exc.args else None
    reason = getattr(inner, "reason", None) or inner or exc
    if not isinstance(reason, BaseException):
        reason = exc
    text = str(reason)
    if "): " in text:  # drop urllib3's "HTTPSConnection(host=..., port=...): " prefix
        text = text.split("): ", 1)[1]
    text = text if len(text) <= 160 else text[:160] + "..."
    return f"{type(reason).__name__}: {text}"


class GTTSEngine(TTSEngine):
    name = "gtts"
    online = True

    def __init__(self, timeout_s: float = 10.0, tld: str = "com", retries: int = 1,
                 retry_delay_s: float = 0.3):
        self.timeout_s = float(timeout_s)
        self.tld = tld
        self.retries = int(retries)
        self.retry_delay_s = retry_delay_s
        self.last_failure: tuple[float, str] | None = None  # (monotonic time, message)
        try:
            from gtts.lang import tts_langs  # static table in gTTS 2.5: no network

            # normalised code -> gTTS's own spelling ('zh-tw' -> 'zh-TW'; its check is case-sensitive)
            self._codes = {normalize_language(c): c for c in tts_langs()}
            self._reason = None  # "available" means installed; whether Google answers is known per call
        except ImportError as e:
            self._codes = {}
            self._reason = f"gTTS not importable: {e}"

    def languages(self) -> list[str]:
        return list(self._codes)

    def voice_for(self, language: str) -> tuple[str, str] | None:
        if not self.available:
            return None
        matched = match_language(language, self._codes)
        return (f"google-translate.{self.tld}", matched) if matched else None

    def _attempt(self, text: str, language: str, budget_s: float) -> _Attempt:
        from gtts import gTTS, gTTSError

        out = _Attempt()

        def run():
            try:
                tts = gTTS(text, lang=language, tld=self.tld, timeout=(budget_s, budget_s))
                out.mp3 = b"".join(tts.stream())
            except gTTSError as e:
                out.error, out.transient = _describe_gtts_error(e, budget_s)
            except (ValueError, AssertionError) as e:  # gTTS's checks on lang / empty text
                out.error = f"gTTS rejected the input: {e}"
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                out.exc = e

        worker = threading.Thread(target=run, name="gtts-call", daemon=True)
        worker.start()
        worker.join(budget_s + _GRACE_S)
        if worker.is_alive():
            out.error = f"unreachable: no complete answer within {budget_s:.3g} s"
        return out

    def synthesize(self, text: str, voice: str, language: str, seed: int | None = None) -> EngineAudio:
        if not self.available:
            raise TTSUnavailable(f"gtts unavailable: {self._reason}")
        deadline = time.monotonic() + self.timeout_s
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if attempt and left <= self.retry_delay_s + 0.5:
                break  # not enough time for a meaningful retry
            result = self._attempt(text, self._codes.get(language, language), max(0.1, left))
            if result.exc is not None:
                raise result.exc
            if result.mp3 is not None:
                if not result.mp3:
                    errors.append("Google TTS answered with no audio")
                    break
                try:  # straight to 16 kHz: the post-processing then has nothing to resample
                    samples = decode_audio_bytes(result.mp3, sample_rate=TARGET_RATE)
                except InvalidAudio as e:
                    errors.append(f"Google TTS audio undecodable: {e.message}")
                    break
                self.last_failure = None
                return EngineAudio(samples=samples, sample_rate=TARGET_RATE)
            errors.append(result.error or "unknown failure")
            if not result.transient:
                break
            time.sleep(self.retry_delay_s)
        if len(set(errors)) == 1:
            message = errors[0] + (f" ({len(errors)} attempts)" if len(errors) > 1 else "")
        else:
            message = "; then ".join(errors)
        self.last_failure = (time.monotonic(), message)
        raise TTSUnavailable(f"gtts: {message}")

    def describe(self) -> dict:
        d = super().describe()
        d.update(tld=self.tld, timeout_s=self.timeout_s,
                 last_failure=self.last_failure[1] if self.last_failure else None)
        return d
