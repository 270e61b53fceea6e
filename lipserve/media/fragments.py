"""A streamed answer: fragmented MP4 (H.264 + AAC) handed out piece by piece as frames arrive.

The file opens with `ftyp` + a `moov` that holds no samples, then one `moof` + `mdat` pair per
fragment; a player (an HTML video element through Media Source Extensions, ffplay, curl into a
file) can start on the first fragment. The whole speech is known before the first frame, so the
audio is written beside each frame as in a whole answer, and every fragment carries the audio
of its frames.

Why the encoder settings differ from a whole answer: a fragment can only be cut at a keyframe,
so the first comes after FIRST_FRAGMENT_FRAMES frames (the answer starts playing after a few
frames are made, not a whole fragment's worth) and then one every FRAGMENT_FRAMES, at fixed
places (no scene-cut keyframes); x264's `zerolatency` tuning (no B-frames, no look-ahead) gives
each frame's packet as soon as the frame is in, and the audio goes a little ahead of the frames
(Mp4Tracks' audio_lead_s), so a fragment leaves when the first frame of the next one is added.
The picture differs from a whole answer's only by codec noise (tests bound it).
"""
from __future__ import annotations

import io
from itertools import chain
from typing import Iterable, Iterator

import av
import numpy as np

from .colour import Colour
from .encode import Mp4Tracks, _even

FRAGMENT_FRAMES = 12  # about half a second at 25 fps: a keyframe, and a fragment, every 12 frames
FIRST_FRAGMENT_FRAMES = 4  # the first fragment: 0.16 s at 25 fps, so playback starts after 5 frames are made
AUDIO_LEAD_S = 0.25  # past the AAC encoder's delay (about 2 frames of 1024 samples and its priming)
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class _Pending(io.RawIOBase):
    """The muxer's output: kept until taken. Not seekable, so the muxer never goes back."""

    def __init__(self):
        super().__init__()
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class FragmentedMp4:
    """Frames in (`add`), fragmented MP4 bytes out as soon as the muxer has them; `finish` ends it."""

    def __init__(self, width: int, height: int, fps: float, audio: np.ndarray | None, sample_rate: int, *,
                 colour: Colour | None = None, crf: int = 23, fragment_frames: int = FRAGMENT_FRAMES):
        self._sink = _Pending()
        # without avoid_negative_ts the fragmenting muxer moves every video frame but the first by the
        # AAC encoder's priming delay (1024 samples), which a player shows as a stalled first frame
        self._container = av.open(self._sink, mode="w", format="mp4",
                                  options={"movflags": MOVFLAGS, "avoid_negative_ts": "make_non_negative"})
        self._tracks = Mp4Tracks(self._container, width, height, fps, audio, sample_rate, crf=crf, colour=colour,
                                 x264={"g": str(fragment_frames), "keyint_min": str(fragment_frames),
                                       "sc_threshold": "0", "forced-idr": "1", "tune": "zerolatency"},
                                 audio_lead_s=AUDIO_LEAD_S)
        self.fps, self.frames = fps, 0
        # x264 counts its keyframe interval from the forced one: keyframes at 0, first, first + fragment, ...
        self.first_fragment_frames = min(FIRST_FRAGMENT_FRAMES, fragment_frames)

    def add(self, image: np.ndarray) -> bytes:
        """Encode one RGB frame; the bytes the muxer wrote meanwhile (often none)."""
        self._tracks.write(image, self.frames / self.fps, keyframe=self.frames == self.first_fragment_frames)
        self.frames += 1
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush both encoders and close: the last fragment."""
        self._tracks.finish()
        self._container.close()
        return self._sink.take()

    def abandon(self) -> None:
        """Close without the last fragment (a failed answer); what was handed out stays incomplete."""
        try:
            self._container.close()
        except av.FFmpegError:
            pass  # closing a half-written container may fail; nothing of it is used
        self._sink.take()


def stream_mp4(frames: Iterable[np.ndarray], fps: float, audio: np.ndarray | None, sample_rate: int, *,
               colour: Colour | None = None, fragment_frames: int = FRAGMENT_FRAMES) -> Iterator[bytes]:
    """RGB frames -> fragmented MP4 bytes, yielded as each piece is written (never empty pieces).

    A failure while frames are produced ends the stream without its last fragment and raises."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to encode")
    height, width = _even(np.asarray(first)).shape[:2]
    writer = FragmentedMp4(width, height, fps, audio, sample_rate, colour=colour, fragment_frames=fragment_frames)
    try:
        for image in chain([first], frames):
            piece = writer.add(image)
            if piece:
                yield piece
    except BaseException:
        writer.abandon()
        raise
    last = writer.finish()
    if last:
        yield last


def mp4_boxes(data: bytes) -> list[str]:
    """The top-level box types of an MP4 file, in order (to check a fragmented file's layout)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        elif size == 0:
            size = len(data) - offset
        if size < 8:
            raise ValueError(f"bad box size {size} at {offset}")
        boxes.append(kind)
        offset += size
    return boxes
