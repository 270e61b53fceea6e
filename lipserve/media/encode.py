"""Encoding: RGB frames (+ mono audio) to H.264 yuv420p + AAC mp4 bytes, the index at the front.

`encode_mp4` is what the service writes. `Mp4Tracks` and `IndexFirstMp4` are its two parts (the
tracks written in step into a container; the container that comes out with its index first), for
writers that need a container of their own: the test clips (devtools/testmedia.py).
"""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from itertools import chain
from typing import Iterable

import av
import numpy as np

from .colour import Colour, is_hd, to_yuv420

AUDIO_BIT_RATE = 128_000  # AAC, mono speech: transparent at this rate (the encoder's default is lower)
# AAC's reconstruction overshoots the input's peaks by up to ~0.5 dB on speech: a peak above -1 dBFS
# could clip in a player's float-to-int conversion, so such audio is turned down to -1 dBFS.
AUDIO_PEAK_LIMIT = 10 ** (-1.0 / 20)
_PRESET = "veryfast"


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

    One pass; video and audio packets are interleaved by time, and the index (moov) comes
    before the media data so players can start before the whole file has arrived. Odd
    widths/heights are padded by one edge pixel (yuv420p needs even sizes). The
    caller passes `frames_needed(fps, len(audio) / sample_rate)` frames so that
    the video ends within one frame of the audio.

    `colour`: the matrix and range the RGB frames are converted with, and the tags written
    (a source's `info.colour.for_output()` keeps its look); None writes no tags and converts
    as players assume for untagged video of this size. Audio is AAC at AUDIO_BIT_RATE, scaled
    down (never clipped) when its peak is above AUDIO_PEAK_LIMIT.
    """
    if fps <= 0:
        raise ValueError("fps must be positive")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to encode")
    height, width = _even(np.asarray(first)).shape[:2]
    output = IndexFirstMp4()
    with output as container:
        tracks = Mp4Tracks(container, width, height, fps, audio, sample_rate, crf=crf, colour=colour)
        for index, image in enumerate(chain([first], frames)):
            tracks.write(image, index / fps)
        tracks.finish()
    return output.data


class IndexFirstMp4:
    """An mp4 output container whose index (moov) is moved before the media data at close
    (the muxer's +faststart); `data` holds the file once the `with` block has ended.

    Faststart rewrites the file by reopening it by name, which an in-memory buffer does not
    have, so the file is written to a private temporary directory and read back.
    """

    def __init__(self):
        self.data: bytes | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._path = ""
        self._container = None

    def __enter__(self) -> av.container.OutputContainer:
        self._folder = tempfile.TemporaryDirectory(prefix="lipserve-mp4-")
        self._path = os.path.join(self._folder.name, "out.mp4")
        self._container = av.open(self._path, mode="w", format="mp4", options={"movflags": "+faststart"})
        return self._container

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self._container.close()
            if kind is None:
                with open(self._path, "rb") as file:
                    self.data = file.read()
        finally:
            self._folder.cleanup()


class Mp4Tracks:
    """An H.264 yuv420p video track (+ an AAC mono track) in an output container, written in step.

    Frames are RGB uint8 [H, W, 3] of one size (odd sizes padded by an edge pixel), converted
    with `colour`'s matrix and range and tagged with it (None: untagged, converted as players
    assume for this size; see Colour). `write(image, t)` puts a frame at t seconds and the audio
    up to the end of that frame; `time_base` is the video's clock (1/fps unless given; a finer
    one keeps irregular frame times). `video` is the video stream, for tags set before writing.
    `x264`: more libx264 options (a streamed answer's keyframe interval and latency tuning).
    `audio_lead_s`: audio is sent this far past each frame, so the muxer, which interleaves by
    time, never holds a video packet back waiting for the AAC encoder's delayed output (a
    streamed answer's fragment then leaves as soon as its frames are in).
    """

    def __init__(self, container, width: int, height: int, fps: float, audio: np.ndarray | None,
                 sample_rate: int, *, crf: int = 23, colour: Colour | None = None,
                 time_base: Fraction | None = None, x264: dict[str, str] | None = None, audio_lead_s: float = 0.0):
        if fps <= 0:
            raise ValueError("fps must be positive")
        rate = Fraction(fps).limit_denominator(1001)
        self.container, self.fps, self.frames, self.audio_lead_s = container, fps, 0, audio_lead_s
        self.time_base = time_base or 1 / rate
        self.video = container.add_stream("libx264", rate=rate)
        self.video.height, self.video.width = height + height % 2, width + width % 2
        self.video.pix_fmt = "yuv420p"
        self.video.codec_context.time_base = self.time_base
        self.video.options = {"preset": _PRESET, "crf": str(crf), **(x264 or {})}
        self.colour = colour if colour is not None else Colour(hd=is_hd(self.video.width, self.video.height))
        context = self.video.codec_context
        context.colorspace, context.color_range = self.colour.matrix, self.colour.range
        context.color_primaries, context.color_trc = self.colour.primaries, self.colour.transfer
        self.audio, self.sample_rate, self.audio_sent, self.sound = None, sample_rate, 0, None
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            self.audio = with_headroom(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0))
        if self.audio is not None and len(self.audio):
            self.sound = container.add_stream("aac", rate=sample_rate)
            self.sound.layout = "mono"
            self.sound.bit_rate = AUDIO_BIT_RATE

    def write(self, image: np.ndarray, t: float, keyframe: bool = False) -> None:
        """The frame at t seconds (`keyframe`: force an IDR frame here), and the audio to its end."""
        image = _even(np.asarray(image))
        if image.shape[:2] != (self.video.height, self.video.width):
            got, want = f"{image.shape[1]}x{image.shape[0]}", f"{self.video.width}x{self.video.height}"
            raise ValueError(f"frame {self.frames} is {got}, expected {want} like the first frame")
        frame = to_yuv420(image, self.colour)
        frame.pts = int(round(t / self.time_base))
        frame.time_base = self.time_base
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I  # with forced-idr, an IDR frame a fragment can start at
        self._mux(self.video.encode(frame))
        self.frames += 1
        if self.sound is not None:
            self._send_audio(t + 1.0 / self.fps + self.audio_lead_s)

    def finish(self) -> None:
        """Flush both encoders: the frames still in the video encoder, the rest of the audio."""
        self._mux(self.video.encode(None))
        if self.sound is not None:
            self._send_audio(len(self.audio) / self.sample_rate)
            self._mux(self.sound.encode(None))

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def _send_audio(self, until_seconds: float) -> None:
        until = min(len(self.audio), int(round(until_seconds * self.sample_rate)))
        frame_size = self.sound.codec_context.frame_size or 1024
        while self.audio_sent < until:
            chunk = self.audio[self.audio_sent : self.audio_sent + frame_size]
            if len(chunk) < frame_size and until < len(self.audio):
                return  # wait for a whole frame unless this is the tail
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self.audio_sent
            frame.time_base = Fraction(1, self.sample_rate)
            self._mux(self.sound.encode(frame))
            self.audio_sent += len(chunk)


def _even(image: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 frame and pad odd sizes by repeating the last row/column."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"frames must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(image)
