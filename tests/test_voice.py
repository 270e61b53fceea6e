"""The voice stage end to end: reference extraction, VoiceConverter on synthetic weights, the speaker cache."""
from __future__ import annotations

import io

import librosa
import numpy as np
import pytest
import scipy.io.wavfile
import torch

from devtools import testmedia
from lipserve.errors import InvalidAudio, NoVoiceFound
from lipserve.settings import Settings
from lipserve.voice import VoiceConverter, VoiceResult, prepare_reference, reference_from_audio, reference_from_video
from lipserve.voice.reference import reference_warnings, trim_silence


def converter_settings(weights_dir, variant: str, **overrides) -> Settings:
    return Settings(weights_dir=weights_dir, device="cpu", allow_synthetic_weights=True, freevc_variant=variant,
                    **overrides)


@pytest.fixture(scope="module")
def converters(voice_small_wavlm_dir) -> dict[str, VoiceConverter]:
    """One converter per variant: the small 1024-wide WavLM from its official-format file, the rest synthetic."""
    return {v: VoiceConverter(converter_settings(voice_small_wavlm_dir, v)) for v in ("freevc", "freevc-s", "freevc-24")}


# -- reference voice ---------------------------------------------------------------------------


def test_video_without_audio_track_is_no_voice_found(silent_video):
    with pytest.raises(NoVoiceFound) as info:
        reference_from_video(silent_video)
    assert info.value.status == 422 and info.value.code == "no_voice_found"
    assert "no audio track" in info.value.message and "options.reference_audio" in info.value.message


def test_video_with_a_silent_audio_track_is_no_voice_found():
    from lipserve import media

    frames = np.full((10, 64, 64, 3), 128, np.uint8)
    video = media.encode_mp4(frames, 10.0, np.zeros(16000, np.float32), 16000)
    with pytest.raises(NoVoiceFound, match="No voiced speech found in the video") as info:
        reference_from_video(video)
    assert "options.reference_audio" in info.value.message


@pytest.mark.parametrize("what, wav", [
    ("digital silence", np.zeros(48000, np.float32)),
    ("near silence", testmedia.tone(3.0, 16000, level=1e-4)),
    ("white noise", np.random.default_rng(0).uniform(-0.3, 0.3, 48000).astype(np.float32)),
    ("a click", np.pad(np.ones(80, np.float32) * 0.5, (24000, 24000))),
])
def test_reference_without_voiced_speech_is_no_voice_found(what, wav):
    with pytest.raises(NoVoiceFound, match="No voiced speech") as info:
        prepare_reference(wav, "video")
    assert "options.reference_audio" in info.value.message, what


def test_reference_from_video_is_trimmed_16k_speech(astronaut_still):
    from lipserve import media

    raw = media.read_audio(astronaut_still, 16000)
    ref = reference_from_video(astronaut_still)
    assert ref.dtype == np.float32 and ref.ndim == 1
    # the track starts with 0.15 s of near silence, which the top_db=20 trim (mostly) removes
    assert 2.0 * 16000 < ref.size < raw.size - 1000
    assert np.abs(ref[:1600]).max() > 10 * np.abs(raw[:1600]).max()


def test_reference_from_separate_audio_file(reference_3s):
    buf = io.BytesIO()
    scipy.io.wavfile.write(buf, 22050, testmedia.speechlike(3.0, 22050, seed=12))
    ref = reference_from_audio(buf.getvalue())
    assert abs(ref.size / 16000 - 3.0) < 0.5  # resampled to 16 kHz, trimmed
    silent = io.BytesIO()
    scipy.io.wavfile.write(silent, 16000, np.zeros(32000, np.float32))
    with pytest.raises(NoVoiceFound, match="reference audio"):
        reference_from_audio(silent.getvalue())


# -- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, rate", [("freevc", 16000), ("freevc-s", 16000), ("freevc-24", 24000)])
def test_convert_2s_with_3s_reference(converters, variant, rate, speech_2s, reference_3s):
    vc = converters[variant]
    result = vc.convert(speech_2s, 16000, prepare_reference(reference_3s, "test"))
    assert isinstance(result, VoiceResult)
    assert result.sample_rate == rate and result.synthetic_weights is True
    hop = 320 if rate == 16000 else 480
    assert abs(result.audio.size - 2.0 * rate) <= hop
    assert result.audio.size == 2 * rate  # we make it exact
    assert result.audio.dtype == np.float32 and np.isfinite(result.audio).all()
    assert np.abs(result.audio).max() <= 1.0 and result.audio.std() > 1e-3
    assert {"wavlm", "speaker_embedding", "synthesis", "similarity", "release_memory"} <= set(result.timings)
    assert result.precision == "fp32" and result.warnings == []
    # voice_similarity: the cosine of the reference's condition and the output's embedding, same encoder
    speaker, _ = vc.speaker_vector(prepare_reference(reference_3s, "test"))
    output16 = result.audio if rate == 16000 else librosa.resample(result.audio, orig_sr=rate, target_sr=16000)
    embedding = vc.embed_speaker(trim_silence(output16))
    expected = float(speaker @ embedding) / float(np.linalg.norm(speaker) * np.linalg.norm(embedding))
    assert result.voice_similarity == pytest.approx(expected, abs=1e-4) and -1 <= result.voice_similarity <= 1


def test_speech_at_another_rate_is_resampled(converters, reference_3s):
    speech = testmedia.speechlike(1.0, 22050, seed=5)  # piper's rate
    result = converters["freevc"].convert(speech, 22050, reference_3s)
    assert result.audio.size == 16000


def test_speaker_cache_hit_skips_the_encoder(converters, speech_2s):
    vc = converters["freevc"]
    reference = testmedia.speechlike(3.0, 16000, seed=99)
    first = vc.convert(speech_2s, 16000, reference, deterministic=True)
    computed = vc.speaker_embeddings_computed
    second = vc.convert(speech_2s, 16000, reference.copy(), deterministic=True)  # same content, a new array
    assert not first.speaker_cached and second.speaker_cached
    assert vc.speaker_embeddings_computed == computed  # the speaker encoder did not run
    assert np.array_equal(first.audio, second.audio)
    assert vc.describe()["speaker_cache"]["hits"] >= 1


@pytest.mark.parametrize("variant", ["freevc", "freevc-s"])
def test_speaker_cache_is_keyed_by_the_reference_content(converters, variant, reference_3s):
    vc = converters[variant]
    tone = testmedia.tone(2.0, 16000, frequency=180.0)
    a, cached_a = vc.speaker_vector(reference_3s)
    computed = vc.speaker_embeddings_computed
    b, cached_b = vc.speaker_vector(reference_3s.copy())
    c, cached_c = vc.speaker_vector(tone)
    assert cached_b and not cached_c and np.array_equal(a, b)
    assert vc.speaker_embeddings_computed == computed + 1
    assert a.shape == (256,) and np.abs(a - c).max() > 1e-4  # another voice, another vector


def test_noise_is_on_by_default_as_in_convert_py_and_off_on_request(converters, reference_3s):
    vc = converters["freevc"]
    speech = testmedia.speechlike(1.0, 16000, seed=3)
    a = vc.convert(speech, 16000, reference_3s, deterministic=True).audio
    b = vc.convert(speech, 16000, reference_3s, deterministic=True).audio
    c = vc.convert(speech, 16000, reference_3s).audio  # the default: the prior sampled at noise scale 1
    d = vc.convert(speech, 16000, reference_3s).audio
    assert np.array_equal(a, b)
    assert np.abs(c - d).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_a_seed_fixes_the_prior_noise(converters, reference_3s):
    vc = converters["freevc"]
    speech = testmedia.speechlike(1.0, 16000, seed=3)
    a = vc.convert(speech, 16000, reference_3s, seed=11).audio
    b = vc.convert(speech, 16000, reference_3s, seed=11).audio
    c = vc.convert(speech, 16000, reference_3s, seed=12).audio
    quiet = vc.convert(speech, 16000, reference_3s, deterministic=True).audio
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3 and np.abs(a - quiet).max() > 1e-3


def test_thin_references_are_warned_about_but_converted(converters, speech_2s):
    vc = converters["freevc"]
    short = prepare_reference(testmedia.speechlike(1.2, 16000, seed=40), "test")
    result = vc.convert(speech_2s, 16000, short, deterministic=True)
    assert result.audio.size == 32000
    assert any("holds only 1.1 s of speech" in w and "1.6 s windows" in w for w in result.warnings)
    # 2.6 s long, but voiced only in 0.6 s of it: the middle is a hum 50 dB under the peak (under the voiced floor)
    burst = testmedia.speechlike(0.3, 16000, seed=41)
    quiet = testmedia.tone(2.0, 16000, frequency=150.0, level=float(np.abs(burst).max()) * 10 ** (-50 / 20))
    sparse = np.concatenate([burst, quiet, burst]).astype(np.float32)
    warnings = reference_warnings(sparse)
    assert len(warnings) == 1 and "little voiced speech" in warnings[0]
    assert reference_warnings(testmedia.speechlike(3.0, 16000, seed=42)) == []


def test_speech_too_short_or_empty_is_invalid_audio(converters, reference_3s):
    with pytest.raises(InvalidAudio, match="at least 25 ms"):
        converters["freevc"].convert(np.zeros(200, np.float32), 16000, reference_3s)
    with pytest.raises(InvalidAudio, match="empty"):
        converters["freevc"].convert(np.zeros(0, np.float32), 16000, reference_3s)


def test_describe(converters):
    info = converters["freevc-24"].describe()
    assert info["variant"] == "freevc-24" and info["sample_rate"] == 24000
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["synthetic_weights"] is True


def test_long_speech_is_converted_in_wavlm_windows(converters, reference_3s):
    # the default window is 30 s; a small one exercises the same path on 4 s of speech
    vc = converters["freevc"]
    speech = testmedia.speechlike(4.0, 16000, seed=7)
    whole = vc.content(speech)
    vc.wavlm_chunk_frames, vc.wavlm_context_frames = 60, 20
    try:
        windowed = vc.content(speech)
        result = vc.convert(speech, 16000, reference_3s)
    finally:
        vc.wavlm_chunk_frames, vc.wavlm_context_frames = 1000, 250
    assert windowed.shape == whole.shape == (1, 1024, 199)
    # the windowed path really ran (the Transformer saw less context), and the conv front end lines up
    assert not torch.equal(windowed, whole) and torch.isfinite(windowed).all()
    assert result.audio.size == speech.size and np.isfinite(result.audio).all()


@pytest.mark.slow
def test_end_to_end_with_the_real_wavlm_large_architecture(tmp_path, speech_2s, reference_3s):
    # nothing in the weights dir: WavLM-Large (24 layers, 315 M), SynthesizerTrn and the speaker
    # encoder all on synthetic weights, as a server started with allow_synthetic_weights runs
    vc = VoiceConverter(converter_settings(tmp_path, "freevc"))
    assert sum(p.numel() for p in vc.wavlm.parameters()) == 315_453_120
    result = vc.convert(speech_2s, 16000, reference_3s)
    assert result.audio.size == 32000 and result.synthetic_weights and np.isfinite(result.audio).all()
    with torch.inference_mode():
        assert vc.content(speech_2s).shape == (1, 1024, 99)


@pytest.fixture(scope="module")
def tts_probe():
    """A short real-shaped probe for the precision check: two seeded piper sentences (16 kHz)."""
    from lipserve.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(Settings(tts_order=["piper"]))
    # the speech is short: bf16 on a CPU without bf16 units is slow; the reference costs only fp32 LSTM time
    speech = tts.synthesize("Hi there.", "en", seed=0)
    reference = tts.synthesize("This is how I sound when I talk.", "en", seed=1)
    return speech.audio, reference.audio, f"piper:{speech.voice}"


@pytest.mark.slow
def test_reduced_precision_is_measured_in_dbfs_on_tts_speech_and_kept_only_within_tolerance(
        converters, monkeypatch, tts_probe):
    # CPU autocast with bf16 stands in for CUDA fp16/bf16: same code path, the check compares to fp32
    import lipserve.voice.converter as converter_mod

    vc = converters["freevc"]
    try:
        vc.autocast = torch.bfloat16
        gap = vc.autocast_gap(tts_probe)
        assert gap.finite and gap.probe == "piper:en_US-joe-medium"
        # bf16 keeps 8 bits of mantissa: a real but small difference, well under the speech itself
        assert -90 < gap.rms_dbfs < -25 and gap.rms_dbfs < gap.peak_dbfs < 0
        monkeypatch.setattr(converter_mod, "AUTOCAST_MAX_GAP_DBFS", gap.rms_dbfs + 1)
        vc._check_autocast(keep_anyway=False, gap=gap)
        assert vc.autocast is torch.bfloat16 and vc.precision_name == "bf16"  # close enough: kept
        result = vc.convert(tts_probe[0][:4000], 16000, tts_probe[1], seed=1)
        assert result.precision == "bf16"
        monkeypatch.setattr(converter_mod, "AUTOCAST_MAX_GAP_DBFS", gap.rms_dbfs - 1)
        vc._check_autocast(keep_anyway=True, gap=gap)
        assert vc.autocast is torch.bfloat16  # set explicitly: kept, with a warning
        vc._check_autocast(keep_anyway=False, gap=gap)
        assert vc.autocast is None and vc.precision_name == "fp32"  # too far from fp32: back to fp32
        assert vc.describe()["precision_gap"]["rms_dbfs"] == round(gap.rms_dbfs, 1)
        vc.autocast = torch.bfloat16
        vc._check_autocast(keep_anyway=True, gap=converter_mod.PrecisionGap(0.0, 0.0, "x", finite=False))
        assert vc.autocast is None  # non-finite output is never kept, even when asked for
    finally:
        vc.autocast, vc.precision_gap = None, None


def test_a_returning_video_reuses_its_trimmed_reference(converters, astronaut_still, monkeypatch):
    vc = converters["freevc"]
    first = vc.reference_from_video(astronaut_still)
    decoded = []
    monkeypatch.setattr("lipserve.voice.reference.reference_from_video", lambda data: decoded.append(data))
    again = vc.reference_from_video(bytes(astronaut_still))  # same bytes, another object
    assert decoded == [] and again is first  # no second decode of the audio track
    assert np.array_equal(first, reference_from_video(astronaut_still))


def test_the_precision_check_speech_is_shipped_real_speech_and_needs_no_tts():
    """The autocast check's input is the recorded asset (devtools/make_voice_probe.py), read without
    building a TTS engine: two sentences of voiced 16 kHz speech, different from each other."""
    from lipserve import tts
    from lipserve.voice.converter import CONTENT_RATE, probe_speech

    built = []
    original = tts.SpeechSynthesizer.__init__
    tts.SpeechSynthesizer.__init__ = lambda self, *a, **k: built.append(1) or original(self, *a, **k)
    try:
        speech, reference, what = probe_speech()
    finally:
        tts.SpeechSynthesizer.__init__ = original
    assert built == [] and "precision_speech.flac" in what
    for audio in (speech, reference):
        assert 2.0 < audio.size / CONTENT_RATE < 8.0
        assert 0.05 < float(np.sqrt(np.mean(audio ** 2))) < 0.5  # voiced, not silence or clipping
    assert speech.size != reference.size
