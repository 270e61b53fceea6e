"""Opening a file from memory and the facts every reader of it needs: its video stream, the
constant-rate timeline, whether it is cut short, its rotation, FFmpeg's errors as 422s."""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

import av
import numpy as np

from lipserve.errors import InvalidMedia

# A stream whose decoded frames stop more than this many timeline slots before its
# stated end is treated as truncated rather than padded with its last frame.
TRUNCATION_SLACK_FRAMES = 2


def open_input(data: bytes, error=InvalidMedia, what: str = "video") -> av.container.InputContainer:
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


@contextmanager
def decode_errors(error=InvalidMedia, what: str = "video") -> Iterator[None]:
    """Turn FFmpeg errors met while demuxing/decoding into the named 422 error."""
    try:
        yield
    except av.FFmpegError as exc:
        raise error(f"the {what} cannot be decoded: {_reason(exc)}") from exc


def video_stream(container) -> av.video.stream.VideoStream:
    # Cover art in audio files shows up as a one-frame "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise InvalidMedia("the file has no video stream")
    return streams[0]


def timeline(stream, data: bytes) -> tuple[float, float, int]:
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
        count, scanned = scan_packets(data, stream.index)
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


def scan_packets(data: bytes, index: int) -> tuple[int, float | None]:
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


def check_sample_data(container, size: int, error=InvalidMedia, what: str = "video") -> None:
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


def rotation_ccw(frame: av.VideoFrame, stream) -> int:
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


def upright(image: np.ndarray, ccw: int) -> np.ndarray:
    if ccw == 0:
        return image
    return np.ascontiguousarray(np.rot90(image, k=ccw // 90))
