"""Deterministic test clips built from a real face photo (scikit-image's astronaut).

Used by tests, `make demo` and benchmarks; not shipped. Every clip is rendered from a pure
function of time, so tests can ask where the face is (`face_box_at`) or what a frame should
look like (`render_frame`) at any instant, including the instants of a variable-frame-rate clip.
Clips are written with the service's own encoder parts (lipserve.media.Mp4Tracks).

Sizes are (width, height) of the upright picture, as a viewer sees it.
"""
from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np

from lipserve import media, warmup
from lipserve.media import Colour

SEED = 1234
AUDIO_RATE = 44100  # like a phone's AAC track, so readers must resample to 16 kHz
PAN_PIXELS_PER_SECOND = 50.0  # motion="pan": the head slides sideways, ~100 px across 2 s
BT709 = Colour(matrix=1, range=1, primaries=1, transfer=1, hd=True)  # how HD cameras tag their video

# A square crop of the 512x512 astronaut photo around her head and shoulders, and
# the face inside it: OpenCV's frontal Haar cascade finds the face at x=177, y=66,
# 95x95 in the full photo, i.e. at (97, 66)-(192, 161) in this crop.
_CROP_X, _CROP_Y, _CROP_SIDE = 80, 0, 288
FACE_IN_CROP = (97, 66, 192, 161)


@lru_cache(maxsize=1)
def _portrait() -> np.ndarray:
    from skimage import data

    photo = data.astronaut()  # 512x512 RGB, ships with scikit-image
    return np.ascontiguousarray(photo[_CROP_Y : _CROP_Y + _CROP_SIDE, _CROP_X : _CROP_X + _CROP_SIDE])


@lru_cache(maxsize=8)
def _background(width: int, height: int) -> np.ndarray:
    """A soft two-colour gradient with fixed grain, so the encoder has texture to code."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(1, width - 1), ys / max(1, height - 1)
    image = np.stack([60 + 90 * u, 80 + 60 * v, 120 + 50 * (1 - u)], axis=-1)
    grain = np.random.default_rng(SEED).normal(0, 4, size=(height, width, 1))
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def _placement(t: float, size: tuple[int, int], motion: bool | str) -> tuple[int, int, int]:
    """(x, y, side) of the portrait square at time t; the square always stays inside the frame.

    motion: True (wander and scale), False (still, centred), "pan" (still size, sliding right at
    PAN_PIXELS_PER_SECOND from 50 px left of centre) or "far" (small, sliding right).
    """
    width, height = size
    short = min(width, height)
    if motion == "far":  # far from the camera: a face of ~8 % of the short side, drifting right
        side = int(round(short * 0.23))
        x = int(round(width * 0.3 + PAN_PIXELS_PER_SECOND * t))
        return min(max(0, x), width - side), int(round(height * 0.35)), side
    if motion == "pan":
        side = int(round(short * 0.85))
        x = int(round((width - side) / 2 - 50 + PAN_PIXELS_PER_SECOND * t))
        return min(max(0, x), width - side), int(round((height - side) / 2)), side
    if motion:
        side = int(round(short * (0.78 + 0.12 * math.sin(2 * math.pi * t / 5.0))))
        fx = 0.5 + 0.45 * math.sin(2 * math.pi * t / 8.0)
        fy = 0.5 + 0.45 * math.cos(2 * math.pi * t / 6.0)
    else:
        side, fx, fy = int(round(short * 0.85)), 0.5, 0.5
    x = int(round((width - side) * fx))
    y = int(round((height - side) * fy))
    return x, y, side


def face_box_at(t: float, size: tuple[int, int] = (640, 360), motion: bool | str = True) -> tuple[int, int, int, int]:
    """Ground-truth face box (x1, y1, x2, y2) in upright display pixels at time t seconds."""
    x, y, side = _placement(t, size, motion)
    scale = side / _CROP_SIDE
    x1, y1, x2, y2 = FACE_IN_CROP
    return (
        int(round(x + x1 * scale)),
        int(round(y + y1 * scale)),
        int(round(x + x2 * scale)),
        int(round(y + y2 * scale)),
    )


def face_box_truth(
    index: int, fps: float = 25, size: tuple[int, int] = (640, 360), motion: bool | str = True
) -> tuple[int, int, int, int]:
    """Ground-truth face box in frame `index` of a constant-rate clip (upright pixels)."""
    return face_box_at(index / fps, size, motion)


def render_frame(t: float, size: tuple[int, int] = (640, 360), motion: bool | str = True,
                 cut_away: tuple[float, float] | None = None,
                 tilt: tuple[float, float, float] | None = None) -> np.ndarray:
    """The upright RGB picture at time t: the astronaut portrait moved and scaled over a gradient,
    or, for t in [cut_away[0], cut_away[1]), a face-less picture (the camera turned away).
    `tilt` (start, end, degrees): in between, the head is tilted in-plane about the face's centre
    (counter-clockwise for positive degrees), so `face_box_at` stays its centre and size."""
    if cut_away is not None and cut_away[0] <= t < cut_away[1]:
        return _noface_frame(t, size)
    width, height = size
    frame = _background(width, height).copy()
    x, y, side = _placement(t, size, motion)
    portrait = cv2.resize(_portrait(), (side, side), interpolation=cv2.INTER_AREA)
    if tilt is not None and tilt[0] <= t < tilt[1]:
        scale = side / _CROP_SIDE
        centre = ((FACE_IN_CROP[0] + FACE_IN_CROP[2]) / 2 * scale, (FACE_IN_CROP[1] + FACE_IN_CROP[3]) / 2 * scale)
        turn = cv2.getRotationMatrix2D(centre, tilt[2], 1.0)
        portrait = cv2.warpAffine(portrait, turn, (side, side), borderMode=cv2.BORDER_REFLECT)
    frame[y : y + side, x : x + side] = portrait
    return frame


def _noface_frame(t: float, size: tuple[int, int]) -> np.ndarray:
    """Drifting smooth colour noise over a gradient: texture but nothing face-like."""
    width, height = size
    rng = np.random.default_rng(SEED + 1)
    blobs = rng.uniform(0, 255, size=(9, 16, 3)).astype(np.float32)
    smooth = cv2.resize(blobs, (width + 64, height), interpolation=cv2.INTER_CUBIC)
    shift = int(t * 20) % 64
    layer = smooth[:, shift : shift + width]
    base = _background(width, height).astype(np.float32)
    return np.clip(0.5 * base + 0.5 * layer, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- audio


def tone(seconds: float, sample_rate: int = AUDIO_RATE, frequency: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (level * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def speechlike(seconds: float, sample_rate: int = AUDIO_RATE, seed: int = SEED) -> np.ndarray:
    """The warm-up's speech-shaped signal (lipserve.warmup.speechlike), with this module's defaults."""
    return warmup.speechlike(seconds, sample_rate, seed)


def _audio_track(kind: str | None, seconds: float, sample_rate: int) -> np.ndarray | None:
    if kind is None:
        return None
    if kind == "tone":
        return tone(seconds, sample_rate)
    if kind == "speechlike":
        return speechlike(seconds, sample_rate)
    raise ValueError(f"audio must be 'tone', 'speechlike' or None, not {kind!r}")


# ---------------------------------------------------------------- clips


def _vfr_times(seconds: float, fps: float, seed: int = SEED) -> list[float]:
    """Irregular frame instants averaging about `fps`: gaps of 0.5, 1 or 1.5 nominal frames.

    The last frame sits one nominal frame before the end, so the clip lasts `seconds`.
    """
    rng = np.random.default_rng(seed)
    last = seconds - 1.0 / fps
    times, t = [], 0.0
    while t < last - 0.25 / fps:
        times.append(t)
        t += rng.choice([0.5, 1.0, 1.5]) / fps
    times.append(last)
    return times


def _clip(render, size, seconds, fps, audio, rotate, vfr, index_first=True, colour=None) -> bytes:
    if rotate not in (0, 90, 180, 270):
        raise ValueError("rotate must be 0, 90, 180 or 270")
    times = _vfr_times(seconds, fps) if vfr else [i / fps for i in range(max(1, round(seconds * fps)))]
    width, height = size[::-1] if rotate in (90, 270) else size
    # Stored picture = upright picture turned counter-clockwise by `rotate`; the tag tells
    # players to turn it back clockwise, as phones do for portrait video.
    frames = (np.rot90(render(t), k=rotate // 90) for t in times)
    return _write_mp4(frames, times, fps, _audio_track(audio, seconds, AUDIO_RATE), (width, height),
                      vfr=vfr, rotate=rotate, index_first=index_first, colour=colour)


def encode_clip(stored_frames, fps: float, rotate: int = 0) -> bytes:
    """An mp4 of frames already stored turned (RGB, one size, constant rate, no audio), tagged with
    the clockwise display rotation `rotate` as a phone tags portrait video; index first."""
    frames = iter(stored_frames)
    first = next(frames)
    images = itertools.chain([first], frames)
    times = (i / fps for i in itertools.count())
    return _write_mp4(images, times, fps, None, (first.shape[1], first.shape[0]), vfr=False, rotate=rotate,
                      index_first=True, colour=None)


def _write_mp4(frames, times, fps, audio, stored_size, *, vfr, rotate, index_first, colour) -> bytes:
    """The service's encoder parts (media.Mp4Tracks) with what test clips add: frame times of their
    own (a fine clock for VFR), a display rotation tag, and the index left at the end when asked
    (as many cameras write it: a truncated copy then has no index at all)."""
    buffer = io.BytesIO()
    output = media.IndexFirstMp4() if index_first else av.open(buffer, mode="w", format="mp4")
    with output as container:
        tracks = media.Mp4Tracks(container, *stored_size, fps, audio, AUDIO_RATE, crf=20, colour=colour,
                                 time_base=Fraction(1, 90000) if vfr else None)
        if rotate:
            tracks.video.set_display_rotation(-rotate)
        for image, t in zip(frames, times):
            tracks.write(image, t)
        tracks.finish()
    return output.data if index_first else buffer.getvalue()


def astronaut_clip(
    seconds: float = 10.0,
    fps: float = 25,
    size: tuple[int, int] = (640, 360),
    audio: str | None = "speechlike",
    motion: bool | str = True,
    rotate: int = 0,
    vfr: bool = False,
    index_first: bool = True,
    cut_away: tuple[float, float] | None = None,
    colour: Colour | None = None,
    tilt: tuple[float, float, float] | None = None,
) -> bytes:
    """An mp4 of the astronaut's face moving and scaling over time (H.264 + AAC 44.1 kHz).

    size is the upright (width, height); `rotate` stores the picture turned and tags it
    with that clockwise display rotation (90 → a phone's portrait video). `vfr` gives
    irregular frame times averaging `fps`. `index_first=False` leaves the moov box at the end
    (as cameras write it; a truncated copy then has no index at all). The face's box at
    time t is `face_box_at(t, size, motion)`; `motion="pan"` slides it sideways. `cut_away`
    (start, end) seconds shows a face-less picture in between. `colour` converts and tags the
    picture (e.g. BT709, as HD cameras do); None leaves it untagged, converted as players assume.
    `tilt` (start, end, degrees) tilts the head in between (render_frame).
    """
    return _clip(lambda t: render_frame(t, size, motion, cut_away, tilt), size, seconds, fps, audio, rotate, vfr,
                 index_first, colour)


def noface_clip(
    seconds: float = 2.0, fps: float = 25, size: tuple[int, int] = (640, 360), audio: str | None = "speechlike"
) -> bytes:
    """A valid video with texture and motion but no face anywhere."""
    return _clip(lambda t: _noface_frame(t, size), size, seconds, fps, audio, 0, False)


def astronaut_photo(size: tuple[int, int] = (640, 360), fmt: str = ".jpg") -> bytes:
    """A still picture of the face (the first frame of a still clip) as JPEG or PNG bytes."""
    if fmt not in (".jpg", ".png"):
        raise ValueError("fmt must be '.jpg' or '.png'")
    ok, encoded = cv2.imencode(fmt, cv2.cvtColor(render_frame(0.0, size, motion=False), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"cv2 could not encode a {fmt} picture")
    return encoded.tobytes()


def precision_face_crops(count: int = 8, side: int = 96) -> np.ndarray:
    """[count, side, side, 3] RGB face crops of the moving test clip, as Wav2Lip sees them: the face
    box grown by the default pads (20 px below) and resized to the model's input. Shipped as
    lipserve/lipsync/assets/precision_faces.png for the reduced-precision check at load."""
    crops = []
    for k in range(count):
        t = 0.3 + 1.1 * k
        x1, y1, x2, y2 = face_box_at(t)
        frame = render_frame(t)
        crop = frame[max(0, y1):min(frame.shape[0], y2 + 20), max(0, x1):min(frame.shape[1], x2)]
        crops.append(cv2.resize(crop, (side, side)))
    return np.stack(crops)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` share of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * keep)]


def write_demo_clip(path: str | Path, seconds: float = 10.0, **options) -> Path:
    """Write an astronaut clip to `path` (for the demo and manual checks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(astronaut_clip(seconds=seconds, **options))
    return path


def browser_webm_clip(
    seconds: float = 1.5, fps: float = 30, size: tuple[int, int] = (320, 180), audio: str | None = "speechlike"
) -> bytes:
    """A WebM like a browser's MediaRecorder writes: VP8 + Opus, written live, so it states
    no duration and has no index (readers must find the length from the packets)."""
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm", options={"live": "1"}) as container:
        video = container.add_stream("libvpx", rate=int(fps))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "1M"}
        track = _audio_track(audio, seconds, 48000)
        sound = None
        if track is not None:
            sound = container.add_stream("libopus", rate=48000)
            sound.layout = "mono"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(render_frame(i / fps, size), format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if sound is not None:
            for at in range(0, len(track), 960):  # Opus codes 20 ms frames
                frame = av.AudioFrame.from_ndarray(track[None, at : at + 960], format="flt", layout="mono")
                frame.sample_rate, frame.pts = 48000, at
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
    return buffer.getvalue()
