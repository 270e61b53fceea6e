"""What a video is before it is decoded: size (upright), timeline, audio, colour, still or moving."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lipserve.errors import InvalidMedia

from .colour import Colour, frame_colour
from .source import (TRUNCATION_SLACK_FRAMES, check_sample_data, decode_errors, open_input, rotation_ccw,
                     scan_packets, timeline, video_stream)


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


def probe(data: bytes) -> VideoInfo:
    """Size, timeline and audio facts of a video; decodes one frame (rotation, decodability)."""
    container = open_input(data)
    with container, decode_errors():
        stream = video_stream(container)
        fps, duration, n_frames = timeline(stream, data)
        check_sample_data(container, len(data))
        if len(stream.index_entries) < 2:
            # No index to check against (Matroska/WebM lose their cues when cut short):
            # compare the packets actually present with the stated length instead.
            _, present = scan_packets(data, stream.index)
            missing = round((duration - (present or 0.0)) * fps)
            if missing > TRUNCATION_SLACK_FRAMES:
                raise InvalidMedia(f"the video is truncated: {missing} of {n_frames} frames are missing")
        first = next(iter(container.decode(stream)), None)
        if first is None:
            raise InvalidMedia("the video stream holds no decodable frame")
        ccw = rotation_ccw(first, stream)
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
            colour=frame_colour(first),
            is_image=container.format.name.endswith("_pipe") or container.format.name.startswith("image2"),
        )


def frames_needed(fps: float, seconds: float) -> int:
    """Output frames covering `seconds` of audio at `fps` (the last frame may overhang)."""
    if fps <= 0:
        raise ValueError("fps must be positive")
    return max(1, math.ceil(seconds * fps - 1e-6))


@dataclass(frozen=True)
class SourceVideo:
    """A request's source video as every stage needs it, made once where it is read: its bytes
    (or a token for them that a stage exchanges for the bytes, `with_data`), the hash its caches
    are keyed by, and its probe. Nothing downstream hashes or probes the same bytes again."""

    data: Any
    key: str
    info: VideoInfo

    @classmethod
    def of(cls, data: bytes) -> "SourceVideo":
        from ..cache import content_key

        return cls(data, content_key(data), probe(data))

    def with_data(self, data) -> "SourceVideo":
        return replace(self, data=data)


def as_source(video) -> SourceVideo:
    """A SourceVideo as given, or made from raw bytes (callers without an ingress: tests, tools)."""
    return video if isinstance(video, SourceVideo) else SourceVideo.of(video)
