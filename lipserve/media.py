"""In-process video and audio I/O with PyAV: probe, decode, read audio, encode mp4.

Everything works on bytes in memory (no temporary files, no ffmpeg subprocess).
Frames come out as RGB uint8, upright (rotation metadata applied), on a constant
frame-rate timeline at the stream's average rate: variable-frame-rate input is
mapped onto that timeline by timestamp, so frame i always shows time i / fps.

Anything a user can send that is not decodable video raises `InvalidMedia` (422);
audio files that cannot be decoded raise `InvalidAudio` (422).
"""
from __future__ import annotations

import io
import logging
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

from lipserve.errors import InvalidAudio, InvalidMedia

log = logging.getLogger(__name__)

# A stream whose decoded frames stop more than this many timeline slots before its
# stated end is treated as truncated rather than padded with its last frame.
_TRUNCATION_SLACK_FRAMES = 2


# ---------------------------------------------------------------- colour
#
# FFmpeg's colour tags (AVColorSpace / AVColorRange / AVColorPrimaries / AVColorTransferCharacteristic
# values, as PyAV's frame and codec-context attributes give and take them).
MATRIX_RGB, MATRIX_BT709, MATRIX_UNSPECIFIED, MATRIX_BT470BG, MATRIX_SMPTE170M = 0, 1, 2, 5, 6
RANGE_UNSPECIFIED, RANGE_TV, RANGE_PC = 0, 1, 2
PRIMARIES_BT709, PRIMARIES_UNSPECIFIED = 1, 2
TRANSFER_BT709, TRANSFER_UNSPECIFIED = 1, 2
# matrix tag -> swscale's name for the same matrix (only these can be converted)
_SWS_MATRIX = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
               7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}
_MATRIX_NAMES = {0: "rgb", 1: "bt709", 2: "unspecified", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                 9: "bt2020nc", 10: "bt2020c"}
_RANGE_NAMES = {0: "unspecified", 1: "tv", 2: "pc"}
# swscale's default YUV->RGB path skips chroma interpolation and rounds down: measured on the test
# clips, every channel came out 1-2 levels dark. Full chroma interpolation + accurate rounding
# round-trips with a mean shift under 0.05 levels (encode side: accurate rounding suffices).
_TO_RGB_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
_TO_YUV_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND


def is_hd(width: int, height: int) -> bool:
    """Players' rule for untagged video (mpv, browsers): BT.709 from 1280 wide or over 576 lines."""
    return width >= 1280 or height > 576


@dataclass(frozen=True)
class Colour:
    """A video's colour tags as stored (MATRIX_/RANGE_/PRIMARIES_/TRANSFER_ values; 2 or 0 = untagged),
    and whether players take it for HD (from the stored picture size; see is_hd).

    Untagged values are resolved the way players resolve them: BT.709 for HD, BT.601 below,
    limited ("tv") range.
    """

    matrix: int = MATRIX_UNSPECIFIED
    range: int = RANGE_UNSPECIFIED
    primaries: int = PRIMARIES_UNSPECIFIED
    transfer: int = TRANSFER_UNSPECIFIED
    hd: bool = False

    @property
    def tagged(self) -> bool:
        return self.matrix in _SWS_MATRIX

    def conversion(self) -> tuple[Colorspace, ColorRange]:
        """(swscale matrix, range) for converting between RGB and this video's YUV."""
        if self.tagged:
            matrix = _SWS_MATRIX[self.matrix]
        else:
            matrix = Colorspace.ITU709 if self.hd else Colorspace.ITU601
        return matrix, ColorRange.JPEG if self.range == RANGE_PC else ColorRange.MPEG

    def for_output(self) -> "Colour":
        """The tags an output re-encoding this video carries: the same matrix, range, primaries and
        transfer, with an untagged matrix and range written as what players assumed (the output's
        picture size may differ: rotation applied, resize_factor). An untagged HD source also gets
        BT.709 primaries and transfer, the guess every player makes for HD; below HD the guesses
        differ between players (SMPTE-C, PAL, BT.709), so those stay untagged."""
        matrix = self.matrix if self.tagged else (MATRIX_BT709 if self.hd else MATRIX_SMPTE170M)
        primaries, transfer = self.primaries, self.transfer
        if not self.tagged and self.hd:
            primaries = PRIMARIES_BT709 if primaries == PRIMARIES_UNSPECIFIED else primaries
            transfer = TRANSFER_BT709 if transfer == TRANSFER_UNSPECIFIED else transfer
        return Colour(matrix, RANGE_PC if self.range == RANGE_PC else RANGE_TV, primaries, transfer, self.hd)

    def names(self) -> dict[str, str]:
        return {"matrix": _MATRIX_NAMES.get(self.matrix, str(self.matrix)),
                "range": _RANGE_NAMES.get(self.range, str(self.range)),
                "primaries": str(self.primaries), "transfer": str(self.transfer)}


def _colour_of(frame: av.VideoFrame) -> Colour:
    """The tags of a decoded frame; an RGB frame (PNG) has no YUV matrix, a yuvj frame is full range."""
    hd = is_hd(frame.width, frame.height)
    if frame.format.is_rgb:
        return Colour(MATRIX_UNSPECIFIED, RANGE_UNSPECIFIED, frame.color_primaries, frame.color_trc, hd)
    colour_range = frame.color_range
    if colour_range == RANGE_UNSPECIFIED and frame.format.name.startswith("yuvj"):
        colour_range = RANGE_PC
    return Colour(frame.colorspace, colour_range, frame.color_primaries, frame.color_trc, hd)


def _to_rgb(frame: av.VideoFrame, colour: Colour) -> np.ndarray:
    """A decoded frame as RGB uint8, converted with its own matrix and range (see Colour)."""
    if frame.format.is_rgb:
        return frame.to_ndarray(format="rgb24")
    matrix, colour_range = colour.conversion()
    return frame.to_ndarray(format="rgb24", src_colorspace=matrix, src_color_range=colour_range,
                            interpolation=_TO_RGB_FLAGS)


@dataclass
class VideoInfo:
    width: int  # upright (after rotation metadata is applied)
    height: int
    fps: float  # average frame rate; frames are returned on this constant-rate timeline
    n_frames: int  # frames on that timeline
    duration: float  # seconds
    rotation: int  # 0/90/180/270, clockwise degrees to display upright (phones' `rotate` tag)
    has_audio: bool
    audio_rate: int | None
    video_codec: str
    colour: Colour = Colour()  # the stream's colour tags (see Colour for untagged video)
    is_image: bool = False  # a still photo (JPEG/PNG...), not a video


# ---------------------------------------------------------------- opening


def _open(data: bytes, error=InvalidMedia, what: str = "video") -> av.container.InputContainer:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise error(f"the {what} file is empty")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        raise error(f"cannot read the {what} file: {_reason(exc)}") from exc


def _reason(exc: av.FFmpegError) -> str:
    """FFmpeg's own words, without PyAV's '<none>' file name noise."""
    return getattr(exc, "strerror", None) or str(exc)


def _video_stream(container) -> av.video.stream.VideoStream:
    # Cover art in audio files shows up as a one-frame "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise InvalidMedia("the file has no video stream")
    return streams[0]


def _timeline(stream, data: bytes) -> tuple[float, float, int]:
    """(fps, duration, n_frames) of the constant-rate timeline, from headers where they suffice."""
    rate = stream.average_rate
    duration = None
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        duration = float(stream.duration * stream.time_base)
    elif stream.container.duration is not None and stream.container.duration > 0:
        duration = stream.container.duration / av.time_base
    if duration is None or not rate:
        # Live-written files (a browser's MediaRecorder webm) state no duration: read the
        # packet timestamps, which is demuxing only, no decoding.
        count, scanned = _scan_packets(data, stream.index)
        duration = duration or scanned
        if not rate and count and duration:
            rate = count / duration
    rate = rate or stream.guessed_rate or stream.base_rate
    if not rate or not 0 < float(rate) <= 1000:
        raise InvalidMedia("the video has no usable frame rate")
    if not duration or duration <= 0:
        raise InvalidMedia("the video's duration is unknown")
    fps = float(rate)
    n_frames = max(1, round(duration * fps))
    return fps, n_frames / fps, n_frames


def _scan_packets(data: bytes, index: int) -> tuple[int, float | None]:
    """(packets, seconds from first to last packet end) of one stream, by demuxing a fresh copy."""
    count, first, end, last_has_duration = 0, None, None, True
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams[index]
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            count += 1
            start = float(packet.pts * stream.time_base)
            stop = start + float((packet.duration or 0) * stream.time_base)
            first = start if first is None else min(first, start)
            if end is None or stop >= end:
                end, last_has_duration = stop, bool(packet.duration)
    if count == 0:
        return 0, None
    span = end - first
    if not last_has_duration and count > 1:
        span += span / (count - 1)  # the last frame lasts one average frame
    return count, span


def _check_sample_data(container, size: int, error=InvalidMedia, what: str = "video") -> None:
    """A file cut short keeps its index (when the index comes first) but loses the samples
    it points to; demuxers then stop early without an error, so look before decoding."""
    for stream in container.streams:
        entries = stream.index_entries
        if len(entries) == 0:
            continue
        last = entries[len(entries) - 1]
        if last.pos >= 0 and last.pos + last.size > size:
            raise error(
                f"the {what} file is truncated: its index points {last.pos + last.size - size} bytes past the end"
            )


def _rotation_ccw(frame: av.VideoFrame, stream) -> int:
    """Counter-clockwise degrees to turn a decoded frame upright (multiple of 90)."""
    ccw = frame.rotation  # from the display matrix side data; 0 when absent
    # the legacy tag, clockwise; its case varies by container (Matroska keeps it as ROTATE)
    legacy = next((value for key, value in stream.metadata.items() if key.lower() == "rotate"), None)
    if not ccw and legacy is not None:
        try:
            ccw = -int(float(legacy))
        except ValueError:
            ccw = 0  # an unreadable legacy tag means no rotation, as players treat it
    return int(round(ccw / 90.0)) * 90 % 360


def _upright(image: np.ndarray, ccw: int) -> np.ndarray:
    if ccw == 0:
        return image
    return np.ascontiguousarray(np.rot90(image, k=ccw // 90))


@contextmanager
def _decode_errors(error=InvalidMedia, what: str = "video") -> Iterator[None]:
    """Turn FFmpeg errors met while demuxing/decoding into the named 422 error."""
    try:
        yield
    except av.FFmpegError as exc:
        raise error(f"the {what} cannot be decoded: {_reason(exc)}") from exc


# ---------------------------------------------------------------- video


def probe(data: bytes) -> VideoInfo:
    """Size, timeline and audio facts of a video; decodes one frame (rotation, decodability)."""
    container = _open(data)
    with container, _decode_errors():
        stream = _video_stream(container)
        fps, duration, n_frames = _timeline(stream, data)
        _check_sample_data(container, len(data))
        if len(stream.index_entries) < 2:
            # No index to check against (Matroska/WebM lose their cues when cut short):
            # compare the packets actually present with the stated length instead.
            _, present = _scan_packets(data, stream.index)
            missing = round((duration - (present or 0.0)) * fps)
            if missing > _TRUNCATION_SLACK_FRAMES:
                raise InvalidMedia(f"the video is truncated: {missing} of {n_frames} frames are missing")
        first = next(iter(container.decode(stream)), None)
        if first is None:
            raise InvalidMedia("the video stream holds no decodable frame")
        ccw = _rotation_ccw(first, stream)
        width, height = first.width, first.height
        if ccw in (90, 270):
            width, height = height, width
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            n_frames=n_frames,
            duration=duration,
            rotation=(-ccw) % 360,
            has_audio=audio is not None,
            audio_rate=audio.rate if audio is not None else None,
            video_codec=stream.codec_context.name,
            colour=_colour_of(first),
            is_image=container.format.name.endswith("_pipe") or container.format.name.startswith("image2"),
        )


def frames_needed(fps: float, seconds: float) -> int:
    """Output frames covering `seconds` of audio at `fps` (the last frame may overhang)."""
    if fps <= 0:
        raise ValueError("fps must be positive")
    return max(1, math.ceil(seconds * fps - 1e-6))


def decode_frames(
    data: bytes, count: int | None = None, *, start: int = 0, stats: dict | None = None
) -> np.ndarray:
    """Frames [start, start+count) of the constant-rate timeline as [N, H, W, 3] uint8 RGB, upright.

    Demuxing stops as soon as the last wanted frame is out, so asking for the first
    N frames of a long clip decodes about N frames. Fewer frames come back when the
    clip is shorter than start+count. `stats['decoded']` counts frames the decoder
    produced, `stats['packets']` packets read.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError("start and count must be >= 0")
    container = _open(data)
    with container, _decode_errors():
        stream = _video_stream(container)
        fps, _, n_frames = _timeline(stream, data)
        _check_sample_data(container, len(data))
        stop = n_frames if count is None else min(n_frames, start + count)
        stream.codec_context.thread_type = "AUTO"
        counters = {"decoded": 0, "packets": 0}
        # Filled in place as frames arrive: a list then np.stack would hold every frame twice.
        out, filled = None, 0
        for image in _timeline_frames(container, stream, fps, n_frames, start, stop, counters):
            if out is None:
                out = np.empty((stop - start, *image.shape), np.uint8)
            out[filled] = image
            filled += 1
        if stats is not None:
            stats.update(counters)
            stats["returned"] = filled
        if out is None:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return out[:filled]


def _timeline_frames(container, stream, fps, n_frames, start, stop, counters) -> Iterator[np.ndarray]:
    """Yield upright RGB arrays for timeline slots [start, stop).

    Slot i shows the decoded frame whose timestamp rounds to i; slots no frame
    lands on repeat the previous frame (VFR gaps), frames landing on a slot
    already filled are dropped (VFR bursts).
    """
    if stop <= start:
        return
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if start > 0:
        # Jump to the keyframe before the first wanted slot instead of decoding from 0.
        target = int((t0 + start / fps) / stream.time_base)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            # Not seekable (no index): the demuxer stays at the start, so decode from there.
            log.debug("seek to frame %d failed (%s); decoding from the start", start, exc)
    next_slot = start
    pending = None  # (frame, cached array) shown for slots that no frame lands on
    ccw = None
    colour = None

    def as_array(entry):
        if entry[1] is None:
            entry[1] = _upright(_to_rgb(entry[0], colour), ccw)
        return entry[1]

    for packet in container.demux(stream):
        counters["packets"] += 1
        for frame in packet.decode():
            counters["decoded"] += 1
            if ccw is None:
                ccw = _rotation_ccw(frame, stream)
                colour = _colour_of(frame)
            t = frame.time if frame.time is not None else (counters["decoded"] - 1) / fps + t0
            slot = round((t - t0) * fps)
            entry = [frame, None]
            while next_slot < min(slot, stop):
                yield as_array(pending if pending is not None else entry)
                next_slot += 1
            if slot == next_slot and next_slot < stop:
                yield as_array(entry)
                next_slot += 1
            pending = entry
            if next_slot >= stop:
                return
    # End of stream: the last frame lasts until the stated end of the clip.
    if pending is None:
        raise InvalidMedia("the video stream holds no decodable frame")
    missing = stop - next_slot
    if stop == n_frames and missing > _TRUNCATION_SLACK_FRAMES:
        raise InvalidMedia(f"the video is truncated: {missing} of {n_frames} frames cannot be decoded")
    for _ in range(missing):
        yield as_array(pending)


# ---------------------------------------------------------------- audio


def _resampled(container, stream, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """The stream at `sample_rate`, mono as the mean of its channels.

    The mean is what librosa.load (FreeVC's loader) gives. FFmpeg's own stereo-to-mono matrix
    weights each channel by 1/sqrt(2), i.e. 3 dB louder than the mean, and the speaker encoder
    is not level-invariant; so the rate is changed per channel (layout kept) and the channels
    are averaged here.
    """
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # layout None: the input's own
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    # AAC decoders return the encoder's padding of the last frame (up to 1024 samples);
    # the container's stated duration says where the real audio ends.
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        stated = int(round(float(stream.duration * stream.time_base) * sample_rate))
        limit = stated if limit is None else min(limit, stated)

    def mono(frame) -> np.ndarray:
        planes = frame.to_ndarray()  # [channels, samples], planar float
        return planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0]

    chunks, total = [], 0
    for frame in container.decode(stream):
        frame.pts = None  # let the resampler count samples; broken pts must not insert gaps
        for out in resampler.resample(frame):
            chunk = mono(out)
            chunks.append(chunk)
            total += chunk.size
        if max_seconds is not None and total >= limit:
            break
    else:
        for out in resampler.resample(None):
            chunks.append(mono(out))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if limit is not None:
        audio = audio[:limit]
    return np.ascontiguousarray(audio, dtype=np.float32)


def read_audio(data: bytes, sample_rate: int = 16000, *, max_seconds: float | None = None) -> np.ndarray | None:
    """The video's audio track as mono float32 at `sample_rate`; None when it has no audio track."""
    container = _open(data)
    with container, _decode_errors(InvalidMedia, "audio track"):
        if not container.streams.audio:
            return None
        _check_sample_data(container, len(data))
        return _resampled(container, container.streams.audio[0], sample_rate, max_seconds)


def decode_audio_bytes(data: bytes, sample_rate: int = 16000, *, max_seconds: float | None = None) -> np.ndarray:
    """Any audio (or video) file's first audio track as mono float32 at `sample_rate`."""
    container = _open(data, InvalidAudio, "audio")
    with container, _decode_errors(InvalidAudio, "audio"):
        if not container.streams.audio:
            raise InvalidAudio("the file has no audio track")
        _check_sample_data(container, len(data), InvalidAudio, "audio")
        audio = _resampled(container, container.streams.audio[0], sample_rate, max_seconds)
    if audio.size == 0:
        raise InvalidAudio("the audio track holds no samples")
    return audio


# ---------------------------------------------------------------- encode

AUDIO_BIT_RATE = 128_000  # AAC, mono speech: transparent at this rate (the encoder's default is lower)
# AAC's reconstruction overshoots the input's peaks by up to ~0.5 dB on speech: a peak above -1 dBFS
# could clip in a player's float-to-int conversion, so such audio is turned down to -1 dBFS.
AUDIO_PEAK_LIMIT = 10 ** (-1.0 / 20)


def with_headroom(audio: np.ndarray) -> np.ndarray:
    """`audio` scaled down so its peak is at most AUDIO_PEAK_LIMIT (a gain, not a limiter)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= AUDIO_PEAK_LIMIT:
        return audio
    return (audio * (AUDIO_PEAK_LIMIT / peak)).astype(np.float32)


def encode_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None,
    sample_rate: int,
    *,
    crf: int = 23,
    colour: Colour | None = None,
) -> bytes:
    """RGB uint8 frames [H, W, 3] (+ mono float audio in [-1, 1]) → H.264 yuv420p + AAC mp4 bytes.

    One pass, in memory; video and audio packets are interleaved by time. Odd
    widths/heights are padded by one edge pixel (yuv420p needs even sizes). The
    caller passes `frames_needed(fps, len(audio) / sample_rate)` frames so that
    the video ends within one frame of the audio.

    `colour`: the matrix and range the RGB frames are converted with, and the tags written
    (a source's `info.colour.for_output()` keeps its look); None writes no tags and converts
    as players assume for untagged video of this size. Audio is AAC at AUDIO_BIT_RATE, scaled
    down (never clipped) when its peak is above AUDIO_PEAK_LIMIT.
    """
    return _write_mp4(frames, fps, audio, sample_rate, crf=crf, colour=colour)


def _write_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None,
    sample_rate: int,
    *,
    crf: int = 23,
    preset: str = "veryfast",
    frame_times: Iterable[float] | None = None,
    display_rotation: int = 0,
    index_first: bool = True,
    colour: Colour | None = None,
) -> bytes:
    """encode_mp4 plus what test clips need: explicit frame times (VFR), a rotation tag,
    and the index left at the end (as many cameras write it).

    `display_rotation` is the clockwise angle a player must apply (phones' `rotate` tag).
    """
    if fps <= 0:
        raise ValueError("fps must be positive")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        audio = with_headroom(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0))
    buffer = io.BytesIO()
    container = av.open(buffer, mode="w", format="mp4")
    rate = Fraction(fps).limit_denominator(1001)
    video = None
    audio_stream = None
    audio_sent = 0
    # Fine clock so explicit (VFR) frame times survive; 1/rate is enough otherwise.
    video_tb = Fraction(1, 90000) if frame_times is not None else 1 / rate
    times = iter(frame_times) if frame_times is not None else None

    def send_audio(until_seconds: float) -> None:
        nonlocal audio_sent
        until = min(len(audio), int(round(until_seconds * sample_rate)))
        frame_size = audio_stream.codec_context.frame_size or 1024
        while audio_sent < until:
            chunk = audio[audio_sent : audio_sent + frame_size]
            if len(chunk) < frame_size and until < len(audio):
                return  # wait for a whole frame unless this is the tail
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = audio_sent
            frame.time_base = Fraction(1, sample_rate)
            for packet in audio_stream.encode(frame):
                container.mux(packet)
            audio_sent += len(chunk)

    try:
        index = -1
        for index, image in enumerate(frames):
            image = _even(np.asarray(image))
            if video is None:
                video = container.add_stream("libx264", rate=rate)
                video.height, video.width = image.shape[:2]
                video.pix_fmt = "yuv420p"
                video.codec_context.time_base = video_tb
                video.options = {"preset": preset, "crf": str(crf)}
                tags = colour if colour is not None else Colour(hd=is_hd(video.width, video.height))
                matrix, colour_range = tags.conversion()
                context = video.codec_context
                context.colorspace, context.color_range = tags.matrix, tags.range
                context.color_primaries, context.color_trc = tags.primaries, tags.transfer
                if display_rotation:
                    video.set_display_rotation(-display_rotation)
                if audio is not None and len(audio):
                    audio_stream = container.add_stream("aac", rate=sample_rate)
                    audio_stream.layout = "mono"
                    audio_stream.bit_rate = AUDIO_BIT_RATE
            elif image.shape[:2] != (video.height, video.width):
                got, want = f"{image.shape[1]}x{image.shape[0]}", f"{video.width}x{video.height}"
                raise ValueError(f"frame {index} is {got}, expected {want} like the first frame")
            # convert here, with the chosen matrix and accurate rounding, not in the encoder's
            # implicit conversion (BT.601, whatever the tags say)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=matrix, dst_color_range=colour_range, interpolation=_TO_YUV_FLAGS)
            t = next(times) if times is not None else index / fps
            frame.pts = int(round(t / video_tb))
            frame.time_base = video_tb
            for packet in video.encode(frame):
                container.mux(packet)
            if audio_stream is not None:
                send_audio(t + 1.0 / fps)
        if video is None:
            raise ValueError("no frames to encode")
        for packet in video.encode(None):
            container.mux(packet)
        if audio_stream is not None:
            send_audio(len(audio) / sample_rate)
            for packet in audio_stream.encode(None):
                container.mux(packet)
    finally:
        container.close()
    return _index_first(buffer.getvalue()) if index_first else buffer.getvalue()


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int, int]]:
    """ISO-BMFF boxes in data[start:end]: (type, box start, payload start, box end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"malformed mp4 box {kind!r} at {pos}")
        yield kind, pos, pos + header, pos + size
        pos += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, shift: int) -> None:
    """Add `shift` to every chunk offset (stco/co64) inside moov[start:end], in place."""
    for kind, _, payload, box_end in _boxes(moov, start, end):
        if kind in (b"trak", b"mdia", b"minf", b"stbl"):
            _shift_chunk_offsets(moov, payload, box_end, shift)
        elif kind in (b"stco", b"co64"):
            count = struct.unpack_from(">I", moov, payload + 4)[0]
            width, code = (4, ">I") if kind == b"stco" else (8, ">Q")
            for i in range(count):
                at = payload + 8 + i * width
                value = struct.unpack_from(code, moov, at)[0] + shift
                if value >= 1 << (8 * width):
                    raise ValueError("chunk offset overflows stco")
                struct.pack_into(code, moov, at, value)


def _index_first(mp4: bytes) -> bytes:
    """Move the moov box (the index) before the media data, like ffmpeg's +faststart.

    Players and browsers can then start before the whole file has arrived. FFmpeg's own
    faststart reopens the output by file name, which an in-memory buffer does not have.
    Files that do not look like a plain ftyp/mdat/moov layout are returned unchanged.
    """
    try:
        boxes = list(_boxes(mp4, 0, len(mp4)))
        kinds = [kind for kind, *_ in boxes]
        if b"moov" not in kinds or b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"):
            return mp4
        _, moov_start, moov_payload, moov_end = boxes[kinds.index(b"moov")]
        mdat_start = boxes[kinds.index(b"mdat")][1]
        moov = bytearray(mp4[moov_start:moov_end])
        _shift_chunk_offsets(moov, moov_payload - moov_start, len(moov), len(moov))
    except (ValueError, struct.error):
        return mp4
    head, rest = mp4[:mdat_start], mp4[mdat_start:moov_start] + mp4[moov_end:]
    return head + bytes(moov) + rest


def _even(image: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 frame and pad odd sizes by repeating the last row/column."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"frames must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(image)
