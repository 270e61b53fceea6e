"""lipserve.media on generated clips: probe, partial decode, rotation, VFR, audio, encode, bad input."""
import io

import av
import cv2
import numpy as np
import pytest

from devtools import testmedia
from lipserve import media
from lipserve.errors import InvalidAudio, InvalidMedia


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def best_correlation(got: np.ndarray, expected: np.ndarray, max_lag: int = 2) -> float:
    """Highest waveform correlation over shifts of up to max_lag samples."""
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        a, b = (got[lag:], expected) if lag >= 0 else (got, expected[-lag:])
        n = min(len(a), len(b))
        best = max(best, float(np.corrcoef(a[:n], b[:n])[0, 1]))
    return best


def haar_faces(rgb: np.ndarray) -> np.ndarray:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    return cascade.detectMultiScale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 1.1, 5)


def wav_bytes(audio: np.ndarray, sample_rate: int, codec: str = "pcm_s16le", fmt: str = "wav") -> bytes:
    """Encode mono float audio into an audio-only file with PyAV (wav, or mp3 like gTTS sends)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------- probe and decode


def test_probe_reports_the_generated_clip(astronaut_10s):
    info = media.probe(astronaut_10s)
    assert (info.width, info.height) == (640, 360)
    assert info.fps == pytest.approx(25.0)
    assert info.n_frames == 250
    assert info.duration == pytest.approx(10.0, abs=0.04)
    assert info.rotation == 0
    assert info.has_audio and info.audio_rate == testmedia.AUDIO_RATE
    assert info.video_codec == "h264"


def test_decoding_n_frames_of_a_long_clip_decodes_about_n(astronaut_10s):
    stats = {}
    frames = media.decode_frames(astronaut_10s, 20, stats=stats)
    assert frames.shape == (20, 360, 640, 3) and frames.dtype == np.uint8
    assert stats["decoded"] <= 20 + 2, stats  # of 250 in the file
    assert stats["packets"] <= 20 + 8, stats  # decoder threads and B-frames read a few ahead
    for i in (0, 7, 19):  # the frames are the right ones, in order
        assert mean_abs_diff(frames[i], testmedia.render_frame(i / 25)) < 4.0


def test_frames_on_demand_are_decode_frames_decoded_only_as_far_as_asked(astronaut_10s):
    """The first 120 frames of a 250-frame clip: indexing decodes in order up to the frame asked
    for, no further, and every form of index gives decode_frames' pixels (with the transform)."""
    eager = media.decode_frames(astronaut_10s, 120)
    lazy = media.FramesOnDemand(astronaut_10s, 120)
    assert len(lazy) == 120 and lazy.shape == eager.shape
    assert lazy.counters["decoded"] <= 1 + 8  # frame 0 (and what the decoder threads read ahead)
    assert np.array_equal(lazy[4], eager[4])
    assert lazy.counters["decoded"] <= 5 + 8
    assert np.array_equal(lazy[np.int64(30), 10:50, 20:90], eager[30, 10:50, 20:90])
    assert np.array_equal(lazy[[3, 60, 2]], eager[[3, 60, 2]])
    assert lazy.counters["decoded"] <= 61 + 8
    assert all(np.array_equal(a, b) for a, b in zip(lazy, eager))
    assert lazy.counters["decoded"] <= 120 + 8 and lazy.counters["seconds"] > 0
    with pytest.raises(IndexError):
        lazy[120]
    halved = media.FramesOnDemand(astronaut_10s, 10, transform=lambda frame: frame[::2, ::2])
    assert halved.shape == (10, 180, 320, 3) and np.array_equal(halved[9], eager[9][::2, ::2])
    with pytest.raises(ValueError):  # a clip whose end is used is decoded whole (its truncation check)
        media.FramesOnDemand(astronaut_10s, 250)


def test_decoding_from_a_start_frame_seeks_and_stays_on_the_timeline(astronaut_10s):
    stats = {}
    frames = media.decode_frames(astronaut_10s, 5, start=200, stats=stats)
    assert frames.shape[0] == 5
    assert stats["decoded"] < 250
    for k in range(5):
        here = mean_abs_diff(frames[k], testmedia.render_frame((200 + k) / 25))
        assert here < 4.0
        assert here < mean_abs_diff(frames[k], testmedia.render_frame((200 + k + 3) / 25))


def test_decode_stops_at_the_end_of_a_short_clip(silent_video):
    info = media.probe(silent_video)
    frames = media.decode_frames(silent_video, info.n_frames + 30)
    assert frames.shape[0] == info.n_frames == 50
    assert media.decode_frames(silent_video, 5, start=info.n_frames).shape[0] == 0


def test_ground_truth_face_box_follows_the_face(astronaut_10s):
    frames = media.decode_frames(astronaut_10s, 76)
    for i in (0, 40, 75):
        found = haar_faces(frames[i])
        assert len(found) == 1
        x, y, w, h = found[0]
        tx1, ty1, tx2, ty2 = testmedia.face_box_truth(i, fps=25)
        assert abs((x + w / 2) - (tx1 + tx2) / 2) < 8 and abs((y + h / 2) - (ty1 + ty2) / 2) < 8
        assert 0.8 < w / (tx2 - tx1) < 1.25


def test_noface_clip_is_valid_video_without_a_face(noface_clip):
    info = media.probe(noface_clip)
    assert info.n_frames == 50 and info.has_audio
    frames = media.decode_frames(noface_clip, 3)
    assert all(len(haar_faces(f)) == 0 for f in frames)


# ---------------------------------------------------------------- rotation and VFR


def test_rotated_portrait_comes_out_upright(portrait_rotated):
    info = media.probe(portrait_rotated)
    assert info.rotation == 90
    assert (info.width, info.height) == (360, 640)
    # Stored landscape: the rotation really comes from the tag, not the pixels.
    with av.open(io.BytesIO(portrait_rotated)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (640, 360)
    frames = media.decode_frames(portrait_rotated, 10)
    assert frames.shape == (10, 640, 360, 3)
    upright = testmedia.render_frame(9 / 25, size=(360, 640))
    assert mean_abs_diff(frames[9], upright) < 4.0
    assert mean_abs_diff(frames[9], upright[::-1, ::-1]) > 20.0  # upside down would fail
    found = haar_faces(frames[9])  # the frontal cascade only finds upright faces
    assert len(found) == 1
    x, y, w, h = found[0]
    tx1, ty1, tx2, ty2 = testmedia.face_box_at(9 / 25, size=(360, 640))
    assert abs(x + w / 2 - (tx1 + tx2) / 2) < 8 and abs(y + h / 2 - (ty1 + ty2) / 2) < 8


@pytest.mark.parametrize("rotate", [180, 270])
def test_every_rotation_tag_comes_out_upright(rotate):
    size = (160, 96) if rotate == 180 else (96, 160)
    clip = testmedia.astronaut_clip(seconds=0.4, size=size, audio=None, rotate=rotate)
    info = media.probe(clip)
    assert info.rotation == rotate and (info.width, info.height) == size
    frames = media.decode_frames(clip)
    assert frames.shape == (10, size[1], size[0], 3)
    upright = testmedia.render_frame(5 / 25, size=size)
    assert mean_abs_diff(frames[5], upright) < 5.0
    assert mean_abs_diff(frames[5], upright[::-1, ::-1]) > 4 * mean_abs_diff(frames[5], upright)


def test_vfr_clip_maps_onto_a_constant_rate_timeline(vfr_clip):
    info = media.probe(vfr_clip)
    assert 20 < info.fps < 27
    assert info.duration == pytest.approx(4.0, abs=1 / info.fps)
    stats = {}
    frames = media.decode_frames(vfr_clip, stats=stats)
    assert frames.shape[0] == info.n_frames
    assert frames.shape[0] / info.fps == pytest.approx(4.0, abs=1 / info.fps)
    # Frame i shows time i / fps: closer to the picture rendered then than 0.12 s either side.
    for i in (5, 30, 61, info.n_frames - 1):
        t = i / info.fps
        here = mean_abs_diff(frames[i], testmedia.render_frame(t))
        assert here < min(mean_abs_diff(frames[i], testmedia.render_frame(t + d)) for d in (-0.12, 0.12))


def test_browser_webm_without_a_stated_duration():
    clip = testmedia.browser_webm_clip(seconds=1.5, fps=30, size=(320, 180))
    with av.open(io.BytesIO(clip)) as container:  # really no duration in the headers
        assert container.duration is None and container.streams.video[0].duration is None
    info = media.probe(clip)
    assert (info.video_codec, info.fps, info.n_frames) == ("vp8", 30.0, 45)
    assert info.duration == pytest.approx(1.5)
    frames = media.decode_frames(clip)
    assert frames.shape == (45, 180, 320, 3)
    assert mean_abs_diff(frames[44], testmedia.render_frame(44 / 30, size=(320, 180))) < 5.0
    assert len(media.read_audio(clip, 16000)) / 16000 == pytest.approx(1.5, abs=0.03)


# ---------------------------------------------------------------- audio


def test_read_audio_resamples_the_track_to_mono_16k(astronaut_10s):
    audio = media.read_audio(astronaut_10s, 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) / 16000 == pytest.approx(10.0, abs=0.05)
    # AAC is lossy and resampling shifts by a sample or so; the waveform still matches.
    assert best_correlation(audio, testmedia.speechlike(10.0, sample_rate=16000)) > 0.9
    native = media.read_audio(astronaut_10s, testmedia.AUDIO_RATE)
    assert best_correlation(native, testmedia.speechlike(10.0), max_lag=0) > 0.95


def test_video_without_audio_is_valid_and_has_no_track(silent_video):
    info = media.probe(silent_video)
    assert not info.has_audio and info.audio_rate is None
    assert media.read_audio(silent_video) is None
    assert media.decode_frames(silent_video, 2).shape == (2, 360, 640, 3)
    with pytest.raises(InvalidAudio):
        media.decode_audio_bytes(silent_video)


def test_decode_audio_bytes_reads_wav_and_24k_mp3():
    speech = testmedia.speechlike(1.5, sample_rate=24000)
    wav = media.decode_audio_bytes(wav_bytes(speech, 24000), 16000)
    assert len(wav) == pytest.approx(1.5 * 16000, abs=2)
    assert best_correlation(wav, testmedia.speechlike(1.5, sample_rate=16000)) > 0.9
    mp3 = media.decode_audio_bytes(wav_bytes(speech, 24000, "libmp3lame", "mp3"), 16000)
    assert len(mp3) / 16000 == pytest.approx(1.5, abs=0.1)  # mp3 pads by up to a frame
    assert np.abs(mp3).max() > 0.2


# ---------------------------------------------------------------- encode


def test_encode_round_trip_keeps_duration_and_audio(astronaut_10s, speech_16k):
    seconds = len(speech_16k) / 16000
    n = media.frames_needed(25, seconds)
    assert n == 50
    frames = media.decode_frames(astronaut_10s, n)
    mp4 = media.encode_mp4(frames, 25, speech_16k, 16000)
    info = media.probe(mp4)
    assert info.has_audio and info.n_frames == n
    assert info.duration == pytest.approx(seconds, abs=1 / 25)
    with av.open(io.BytesIO(mp4)) as container:
        kinds = {s.type: s.codec_context.name for s in container.streams}
        assert kinds == {"video": "h264", "audio": "aac"}
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        audio_seconds = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
        assert audio_seconds == pytest.approx(seconds, abs=1 / 25)
    back = media.read_audio(mp4, 16000)
    assert len(back) / 16000 == pytest.approx(seconds, abs=1 / 25)
    assert best_correlation(back, speech_16k) > 0.9
    boxes = top_level_boxes(mp4)
    assert boxes.index(b"moov") < boxes.index(b"mdat")  # index first: playable while downloading
    again = media.decode_frames(mp4)
    assert again.shape == frames.shape
    assert mean_abs_diff(again[10], frames[10]) < 4.0


def test_encode_pads_odd_sizes_and_takes_an_iterable():
    frames = (np.full((75, 101, 3), 10 * i, np.uint8) for i in range(12))
    mp4 = media.encode_mp4(frames, 24, None, 16000)
    info = media.probe(mp4)
    assert (info.width, info.height) == (102, 76)
    assert info.n_frames == 12 and not info.has_audio
    assert media.decode_frames(mp4)[:, :75, :101].mean(axis=(1, 2, 3)) == pytest.approx(
        [10 * i for i in range(12)], abs=3
    )


def channel_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel mean difference a - b, in 8-bit levels."""
    return (a.astype(np.float64) - b.astype(np.float64)).reshape(-1, 3).mean(axis=0)


COLOUR_CASES = [
    # (size, source colour as written, tags the re-encoded output must carry: matrix, range, primaries, transfer)
    ((640, 360), None, ("smpte170m", "tv", "2", "2")),                       # untagged SD: BT.601 as players assume
    ((1280, 720), None, ("bt709", "tv", "1", "1")),                          # untagged HD: BT.709 as players assume
    ((1280, 720), testmedia.BT709, ("bt709", "tv", "1", "1")),               # a camera's tagged HD
    ((640, 360), media.Colour(6, 2, 6, 6), ("smpte170m", "pc", "6", "6")),  # full range (some phones)
]


@pytest.mark.parametrize("size, colour, tags", COLOUR_CASES, ids=["sd-untagged", "hd-untagged", "hd-bt709", "sd-full"])
def test_colours_survive_decode_and_reencode(size, colour, tags):
    truth = np.stack([testmedia.render_frame(i / 25, size) for i in range(3)])
    source = testmedia.astronaut_clip(seconds=3 / 25, size=size, audio=None, colour=colour)
    info = media.probe(source)
    decoded = media.decode_frames(source)
    # decoded with the matrix and range the source was written with (a wrong matrix moves the
    # channel means by several levels; swscale's fast path alone moved them by 1-2). swscale writes
    # full-range chroma half a level low (measured against the JFIF formulas), which moves R and B
    # by up to 0.8 levels: under one level, the bound, but not under half.
    bound = 1.0 if tags[1] == "pc" else 0.5
    assert np.abs(channel_shift(decoded, truth)).max() < bound, channel_shift(decoded, truth)
    output = media.encode_mp4(decoded, 25, None, 16000, colour=info.colour.for_output())
    out_info = media.probe(output)
    names = out_info.colour.names()
    assert (names["matrix"], names["range"], names["primaries"], names["transfer"]) == tags
    again = media.decode_frames(output)
    assert np.abs(channel_shift(again, decoded)).max() < bound, channel_shift(again, decoded)
    assert mean_abs_diff(again, decoded) < 3.0  # codec noise on a grainy picture


def test_audio_is_aac_128k_with_headroom():
    rate = 44100
    speech = testmedia.speechlike(2.0, rate)
    too_loud = 1.5 * speech / np.abs(speech).max()  # a float voice can exceed full scale
    frames = [np.zeros((64, 64, 3), np.uint8)] * 50
    mp4 = media.encode_mp4(frames, 25, too_loud, rate)
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "aac" and stream.bit_rate > 100_000  # the encoder's default: ~70k
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    peak_db = 20 * np.log10(np.abs(decoded).max())
    assert -1.5 < peak_db < -0.5, peak_db  # turned down to about -1 dBFS, not clipped at 0
    back = media.read_audio(mp4, rate)
    assert best_correlation(back, speech) > 0.95  # the same waveform (a clipped one would not be)
    quiet = testmedia.speechlike(1.0, rate)  # peak -6 dBFS: left as it is
    assert np.array_equal(media.with_headroom(quiet), quiet)


# ---------------------------------------------------------------- bad input


def test_truncated_file_is_invalid_media(truncated_clip):
    # Index first (the fixture): the index survives but points past the end of the data.
    for read in (media.probe, media.decode_frames, media.read_audio):
        with pytest.raises(InvalidMedia, match="truncated") as caught:
            read(truncated_clip)
        assert caught.value.status == 422 and caught.value.code == "invalid_video"
    with pytest.raises(InvalidAudio, match="truncated"):
        media.decode_audio_bytes(truncated_clip)


def test_truncated_camera_file_without_its_index_is_invalid_media():
    clip = testmedia.astronaut_clip(1.0, index_first=False)
    assert media.probe(clip).n_frames == 25
    for keep in (0.3, 0.95):
        for read in (media.probe, media.decode_frames, media.read_audio):
            with pytest.raises(InvalidMedia):
                read(testmedia.truncated(clip, keep))


def test_truncated_matroska_without_cues_is_invalid_media():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(testmedia.render_frame(i / 25, (320, 180)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    whole = buffer.getvalue()
    assert media.probe(whole).n_frames == 50
    cut = testmedia.truncated(whole, 0.8)  # the duration header survives, the cues and last frames do not
    with pytest.raises(InvalidMedia, match="truncated"):
        media.probe(cut)
    with pytest.raises(InvalidMedia, match="truncated"):
        media.decode_frames(cut)
    assert media.decode_frames(cut, 5).shape[0] == 5  # what is there can still be read


def top_level_boxes(mp4: bytes) -> list[bytes]:
    kinds, pos = [], 0
    while pos < len(mp4):
        size = int.from_bytes(mp4[pos : pos + 4], "big")
        kinds.append(mp4[pos + 4 : pos + 8])
        pos += size
    return kinds


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not a video " * 50, b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8],
    ids=["empty", "text", "mp4-header-then-garbage"],
)
def test_non_video_bytes_are_invalid_media(data):
    with pytest.raises(InvalidMedia):
        media.probe(data)
    with pytest.raises(InvalidMedia):
        media.decode_frames(data, 3)


def test_audio_file_is_not_a_video():
    wav = wav_bytes(testmedia.tone(0.5, 16000), 16000)
    with pytest.raises(InvalidMedia, match="no video stream"):
        media.probe(wav)
    with pytest.raises(InvalidAudio):
        media.decode_audio_bytes(b"not audio at all" * 20)


def test_test_media_is_deterministic():
    assert np.array_equal(testmedia.render_frame(1.3), testmedia.render_frame(1.3))
    assert np.array_equal(testmedia.speechlike(0.5), testmedia.speechlike(0.5))
    first = media.decode_frames(testmedia.astronaut_clip(0.4, audio=None))
    second = media.decode_frames(testmedia.astronaut_clip(0.4, audio=None))
    assert np.array_equal(first, second)
