"""In-process video and audio I/O with PyAV: probe, decode, read audio, encode mp4.

Files are read from bytes in memory (no ffmpeg subprocess); an encoded mp4 passes through a
temporary file, where the muxer moves its index to the front. Frames come out as RGB uint8,
upright (rotation metadata applied), on a constant frame-rate timeline at the stream's
average rate: variable-frame-rate input is mapped onto that timeline by timestamp, so frame i
always shows time i / fps.

Anything a user can send that is not decodable video raises `InvalidMedia` (422);
audio files that cannot be decoded raise `InvalidAudio` (422).

colour: Colour and its tags, RGB <-> YUV; probe: VideoInfo, SourceVideo, probe, frames_needed; decode: frames
and audio; encode: encode_mp4 and its parts.
"""
from .colour import (MATRIX_BT470BG, MATRIX_BT709, MATRIX_RGB, MATRIX_SMPTE170M, MATRIX_UNSPECIFIED, PRIMARIES_BT709,
                     PRIMARIES_UNSPECIFIED, RANGE_PC, RANGE_TV, RANGE_UNSPECIFIED, TRANSFER_BT709, TRANSFER_UNSPECIFIED,
                     Colour, is_hd)
from .decode import FramesOnDemand, decode_audio_bytes, decode_frames, read_audio
from .encode import AUDIO_BIT_RATE, AUDIO_PEAK_LIMIT, IndexFirstMp4, Mp4Tracks, encode_mp4, with_headroom
from .probe import SourceVideo, VideoInfo, as_source, frames_needed, probe

__all__ = [
    "AUDIO_BIT_RATE", "AUDIO_PEAK_LIMIT", "Colour", "FramesOnDemand", "IndexFirstMp4", "MATRIX_BT470BG", "MATRIX_BT709", "MATRIX_RGB",
    "MATRIX_SMPTE170M", "MATRIX_UNSPECIFIED", "Mp4Tracks", "PRIMARIES_BT709", "PRIMARIES_UNSPECIFIED", "RANGE_PC",
    "RANGE_TV", "RANGE_UNSPECIFIED", "SourceVideo", "TRANSFER_BT709", "TRANSFER_UNSPECIFIED", "VideoInfo", "as_source",
    "decode_audio_bytes",
    "decode_frames", "encode_mp4", "frames_needed", "is_hd", "probe", "read_audio", "with_headroom",
]
