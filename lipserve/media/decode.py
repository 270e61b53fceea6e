"""Decoding: video frames as RGB uint8, upright (rotation metadata applied), on a constant
frame-rate timeline at the stream's average rate (variable-frame-rate input is mapped onto that
timeline by timestamp, so frame i always shows time i / fps); audio as mono float32 at any rate."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import av
import numpy as np

from lipserve.errors import InvalidAudio, InvalidMedia

from .colour import frame_colour, to_rgb
from .source import (TRUNCATION_SLACK_FRAMES, check_sample_data, decode_errors, open_input, rotation_ccw, timeline,
                     upright, video_stream)

log = logging.getLogger(__name__)


@contextmanager
def _timeline_of(data: bytes, count: int | None, start: int):
    """The opened clip for frames [start, start+count): (container, stream, fps, n_frames, stop)."""
    if start < 0 or (count is not None and count < 0):
        raise ValueError("start and count must be >= 0")
    container = open_input(data)
    with container, decode_errors():
        stream = video_stream(container)
        fps, _, n_frames = timeline(stream, data)
        check_sample_data(container, len(data))
        stream.codec_context.thread_type = "AUTO"
        yield container, stream, fps, n_frames, n_frames if count is None else min(n_frames, start + count)


def decode_frames(
    data: bytes, count: int | None = None, *, start: int = 0, stats: dict | None = None
) -> np.ndarray:
    """Frames [start, start+count) of the constant-rate timeline as [N, H, W, 3] uint8 RGB, upright.

    Demuxing stops as soon as the last wanted frame is out, so asking for the first
    N frames of a long clip decodes about N frames. Fewer frames come back when the
    clip is shorter than start+count. `stats['decoded']` counts frames the decoder
    produced, `stats['packets']` packets read.
    """
    with _timeline_of(data, count, start) as (container, stream, fps, n_frames, stop):
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


class FramesOnDemand:
    """The first `count` frames of a clip (fewer than it has), decoded in order as they are first
    asked for and kept: indexed like decode_frames' array (`frames[i]`, `frames[i, y1:y2, x1:x2]`,
    `frames[[i, j]]`), with `transform` applied to each frame as it is decoded.

    So the first frames of an answer are out before the rest are decoded (a streamed answer's
    first fragment waits for 5 frames, not for every one). Only for a clip that holds more than
    `count` frames: one whose end is used is checked for truncation, which needs the end, so
    decode_frames decodes it whole up front."""

    def __init__(self, data: bytes, count: int, transform=None):
        self.counters = {"decoded": 0, "packets": 0}
        self._count = count
        self._transform = transform or (lambda frame: frame)
        self._frames: np.ndarray | None = None  # [count, H, W, 3], allocated at the first frame, filled in order
        self._filled = 0
        self._timeline = _timeline_of(data, count, 0)
        container, stream, fps, n_frames, stop = self._timeline.__enter__()
        if stop >= n_frames:
            self.close()
            raise ValueError(f"FramesOnDemand takes fewer frames than the clip's {n_frames}, not {count}")
        self._source = _timeline_frames(container, stream, fps, n_frames, 0, stop, self.counters)
        self._upto(0)  # what cannot be decoded at all is an error here, before any answer is made
        self.counters["seconds"] = 0.0  # decoding (and transforming) after this first frame

    def _upto(self, index: int) -> None:
        if index >= self._count or index < 0:
            raise IndexError(f"frame {index} of {self._count}")
        started = time.perf_counter()
        while self._filled <= index:
            with decode_errors():
                frame = next(self._source, None)
            if frame is None:  # _timeline_frames gives every slot before the clip's end; never here
                raise InvalidMedia(f"the video stream ended at frame {self._filled} of {self._count}")
            frame = self._transform(frame)
            if self._frames is None:
                # one array, as decode_frames fills: its pages are touched only as frames land in it
                self._frames = np.empty((self._count, *frame.shape), np.uint8)
            self._frames[self._filled] = frame
            self._filled += 1
        if "seconds" in self.counters:
            self.counters["seconds"] += time.perf_counter() - started
        if self._filled == self._count:
            self.close()

    def close(self) -> None:
        """Close the clip (every frame decoded, or the answer ended early)."""
        if self._timeline is not None:
            timeline_of, self._timeline = self._timeline, None
            timeline_of.__exit__(None, None, None)

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._count, *self._frames[0].shape)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self[index[0]][index[1:]]
        if isinstance(index, (int, np.integer)):
            self._upto(int(index))
            return self._frames[int(index)]
        indices = [int(i) for i in index]
        for i in indices:
            self._upto(i)
        return self._frames[indices]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self._count))


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
            entry[1] = upright(to_rgb(entry[0], colour), ccw)
        return entry[1]

    for packet in container.demux(stream):
        counters["packets"] += 1
        for frame in packet.decode():
            counters["decoded"] += 1
            if ccw is None:
                ccw = rotation_ccw(frame, stream)
                colour = frame_colour(frame)
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
    if stop == n_frames and missing > TRUNCATION_SLACK_FRAMES:
        raise InvalidMedia(f"the video is truncated: {missing} of {n_frames} frames cannot be decoded")
    for _ in range(missing):
        yield as_array(pending)


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
    container = open_input(data)
    with container, decode_errors(InvalidMedia, "audio track"):
        if not container.streams.audio:
            return None
        check_sample_data(container, len(data))
        return _resampled(container, container.streams.audio[0], sample_rate, max_seconds)


def decode_audio_bytes(data: bytes, sample_rate: int = 16000, *, max_seconds: float | None = None) -> np.ndarray:
    """Any audio (or video) file's first audio track as mono float32 at `sample_rate`."""
    container = open_input(data, InvalidAudio, "audio")
    with container, decode_errors(InvalidAudio, "audio"):
        if not container.streams.audio:
            raise InvalidAudio("the file has no audio track")
        check_sample_data(container, len(data), InvalidAudio, "audio")
        audio = _resampled(container, container.streams.audio[0], sample_rate, max_seconds)
    if audio.size == 0:
        raise InvalidAudio("the audio track holds no samples")
    return audio
