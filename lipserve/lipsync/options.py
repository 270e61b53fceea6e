"""One lip-sync request's options, and the rules they must keep."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidField

FACE_MODES = ("auto", "static", "track", "box")


@dataclass
class LipSyncOptions:
    """One request's lip-sync options; None = this stage's setting of the same name (LipSyncer.resolve)."""

    face_mode: str | None = None        # auto | static | track | box
    box: tuple[int, int, int, int] | None = None   # x1, y1, x2, y2 in source pixels
    pads: tuple[int, int, int, int] | None = None  # top, bottom, left, right
    resize_factor: int | None = None
    track_every: int = 5


def check_options(options: LipSyncOptions) -> None:
    """InvalidField (422) for an option out of range; `options` as LipSyncer.resolve returns them."""
    if options.face_mode not in FACE_MODES:
        raise InvalidField(f"face_mode must be one of {', '.join(FACE_MODES)}, not {options.face_mode!r}",
                           field="options.face_mode")
    if not (isinstance(options.resize_factor, int) and 1 <= options.resize_factor <= 8):
        raise InvalidField("resize_factor must be an integer from 1 to 8", field="options.resize_factor")
    if len(options.pads) != 4 or any(int(p) < 0 for p in options.pads):
        raise InvalidField("pads must be four non-negative integers (top, bottom, left, right)", field="options.pads")
    if options.face_mode in ("track", "auto") and options.track_every < 1:
        raise InvalidField("track_every must be at least 1", field="options.track_every")
