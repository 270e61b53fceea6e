"""Colour tags of video and the RGB <-> YUV conversions that honour them.

FFmpeg's colour tags (AVColorSpace / AVColorRange / AVColorPrimaries / AVColorTransferCharacteristic
values, as PyAV's frame and codec-context attributes give and take them).
"""
from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

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


def frame_colour(frame: av.VideoFrame) -> Colour:
    """The tags of a decoded frame; an RGB frame (PNG) has no YUV matrix, a yuvj frame is full range."""
    hd = is_hd(frame.width, frame.height)
    if frame.format.is_rgb:
        return Colour(MATRIX_UNSPECIFIED, RANGE_UNSPECIFIED, frame.color_primaries, frame.color_trc, hd)
    colour_range = frame.color_range
    if colour_range == RANGE_UNSPECIFIED and frame.format.name.startswith("yuvj"):
        colour_range = RANGE_PC
    return Colour(frame.colorspace, colour_range, frame.color_primaries, frame.color_trc, hd)


def to_rgb(frame: av.VideoFrame, colour: Colour) -> np.ndarray:
    """A decoded frame as RGB uint8, converted with its own matrix and range (see Colour)."""
    if frame.format.is_rgb:
        return frame.to_ndarray(format="rgb24")
    matrix, colour_range = colour.conversion()
    return frame.to_ndarray(format="rgb24", src_colorspace=matrix, src_color_range=colour_range,
                            interpolation=_TO_RGB_FLAGS)


def to_yuv420(image: np.ndarray, colour: Colour) -> av.VideoFrame:
    """An RGB uint8 picture (even sizes) as a yuv420p frame in `colour`'s matrix and range.

    Converted here, with accurate rounding, not in the encoder's implicit conversion (BT.601,
    whatever the tags say)."""
    matrix, colour_range = colour.conversion()
    return av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
        format="yuv420p", dst_colorspace=matrix, dst_color_range=colour_range, interpolation=_TO_YUV_FLAGS)
