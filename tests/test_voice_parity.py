"""The voice stage reads and trims audio as FreeVC's convert.py (librosa 0.8) does.

* stereo -> mono is the mean of the channels (librosa.load), not FFmpeg's 1/sqrt(2) matrix;
* the reference's silence is trimmed with librosa 0.8's reflect-padded frame RMS.
"""
from __future__ import annotations

import io

import av
import librosa
import numpy as np

from devtools import testmedia
from lipserve import media
from lipserve.voice import reference_from_audio, reference_from_video
from lipserve.voice.reference import TRIM_HOP_LENGTH, trim_silence


def level_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def stereo_channels(seconds: float, rate: int) -> np.ndarray:
    """[2, samples]: two different voices-like signals, the right one quieter."""
    left = testmedia.speechlike(seconds, rate, seed=31)
    right = 0.5 * testmedia.speechlike(seconds, rate, seed=32)
    return np.stack([left, right]).astype(np.float32)


def stereo_file(channels: np.ndarray, rate: int, codec: str = "pcm_s16le", fmt: str = "wav",
                video: bool = False) -> bytes:
    """An audio file (or a short mp4 with a video stream) whose audio track is `channels` in stereo."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        if video:
            picture = container.add_stream("libx264", rate=10)
            picture.width, picture.height, picture.pix_fmt = 64, 64, "yuv420p"
        sound = container.add_stream(codec, rate=rate)
        sound.layout = "stereo"
        if video:
            for i in range(int(channels.shape[1] / rate * 10)):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 100 + i, np.uint8), format="rgb24")
                for packet in picture.encode(frame):
                    container.mux(packet)
            for packet in picture.encode(None):
                container.mux(packet)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in sound.encode(frame):
            container.mux(packet)
        for packet in sound.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def decoded_channels(data: bytes) -> np.ndarray:
    """Every channel of the first audio track as decoded, no resampling: [channels, samples]."""
    with av.open(io.BytesIO(data)) as container:
        planes = [frame.to_ndarray().astype(np.float32) for frame in container.decode(container.streams.audio[0])]
    return np.concatenate(planes, axis=1)


# -- stereo -> mono --------------------------------------------------------------------------------


def test_stereo_48k_wav_becomes_the_channel_mean():
    channels = stereo_channels(2.0, 48000)
    data = stereo_file(channels, 48000)
    mean = channels.mean(axis=0)
    native = media.decode_audio_bytes(data, 48000)
    assert native.shape == mean.shape
    assert np.abs(native - mean).max() <= 1.5 / 32768  # 16-bit PCM rounding of each channel
    # FFmpeg's downmix would be 20*log10(sqrt(2)) = 3.01 dB louder than the mean
    assert abs(level_db(native) - level_db(mean)) < 0.01
    at16k = media.decode_audio_bytes(data, 16000)
    expected = librosa.resample(mean, orig_sr=48000, target_sr=16000)
    n = min(at16k.size, expected.size)
    assert abs(at16k.size - 32000) <= 1 and abs(level_db(at16k) - level_db(mean)) < 0.1
    # another resampler than librosa's (FFmpeg's swr); in band they agree closely
    assert np.corrcoef(at16k[:n], expected[:n])[0, 1] > 0.995


def test_stereo_48k_aac_track_of_a_video_is_the_channel_mean_everywhere_audio_is_decoded():
    channels = stereo_channels(2.0, 48000)
    video = stereo_file(channels, 48000, codec="aac", fmt="mp4", video=True)
    decoded = decoded_channels(video)  # what the AAC decoder gives per channel
    assert decoded.shape[0] == 2
    mono = media.read_audio(video, 48000)
    n = mono.size
    assert 96000 <= n <= 96000 + 1024  # AAC may keep up to a frame of the encoder's padding
    assert np.abs(mono - decoded[:, :n].mean(axis=0)).max() < 1e-6
    # the reference voice from the video's own track and from the same file given as reference audio
    assert abs(level_db(media.decode_audio_bytes(video, 48000)) - level_db(decoded[:, :n].mean(axis=0))) < 0.01
    from_video = reference_from_video(video)
    from_file = reference_from_audio(video)
    assert np.array_equal(from_video, from_file)
    expected = trim_silence(librosa.resample(decoded[:, :n].mean(axis=0), orig_sr=48000, target_sr=16000))
    assert abs(from_video.size - expected.size) <= TRIM_HOP_LENGTH
    assert abs(level_db(from_video) - level_db(expected)) < 0.1


# -- trimming as librosa 0.8 ---------------------------------------------------------------------


def edge_speech(rate: int = 16000) -> np.ndarray:
    """A quieter tone right from sample 0 (18.5 dB under the loud part), a loud part, then silence."""
    quiet = testmedia.tone(0.2, rate, frequency=200.0, level=0.5 * 10 ** (-18.5 / 20))
    loud = testmedia.tone(1.0, rate, frequency=200.0, level=0.5)
    return np.concatenate([quiet, loud, np.zeros(rate // 2, np.float32)]).astype(np.float32)


def test_trim_keeps_speech_that_starts_at_the_first_sample_as_librosa_0_8_did():
    wav = edge_speech()
    ours = trim_silence(wav, top_db=20)
    # librosa 0.8 reflected the signal for the first frame: it holds the quiet tone at full power
    # (-18.5 dB > -20 dB), so nothing is cut at the start
    assert np.shares_memory(ours, wav) and ours[0] == wav[0] and ours.size < wav.size
    # the installed librosa zero-pads: the first frame loses 3 dB (-21.5 dB) and one hop is cut
    newer, (start, _) = librosa.effects.trim(wav, top_db=20)
    assert start == TRIM_HOP_LENGTH
    # the trailing silence is cut by both, at the same frame
    assert ours.size == librosa.effects.trim(wav, top_db=20)[1][1]


def test_trim_agrees_with_librosa_where_the_edges_are_silent(reference_3s):
    wav = np.concatenate([np.zeros(8000, np.float32), reference_3s, np.zeros(8000, np.float32)])
    ours = trim_silence(wav, top_db=20)
    theirs, (start, stop) = librosa.effects.trim(wav, top_db=20)
    assert np.array_equal(ours, theirs) and start > 0 and stop < wav.size


def test_trim_of_all_equal_samples_keeps_them_and_of_nothing_is_empty():
    assert trim_silence(np.zeros(4000, np.float32)).size == 4000  # every frame is at the (zero) peak
    assert trim_silence(np.zeros(0, np.float32)).size == 0
